//! The local raw image: open it once with the right flags, lock it, and learn its geometry.
//!
//! Everything that can be wrong with an image is found here, before a ublk device exists, so
//! that bad input never leaves a device behind.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nbd_proxy::file_lock::lock_exclusive;

/// Whether to bypass the page cache. In the state file as "on", "off" or "auto", as on the
/// command line.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DirectMode {
    /// O_DIRECT, or fail.
    On,
    /// Buffered I/O through the page cache.
    Off,
    /// O_DIRECT when the filesystem allows it, buffered (with a warning) otherwise.
    Auto,
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {path}: cannot open")]
    Open { path: PathBuf, source: io::Error },
    #[error("image {path}: the filesystem refuses O_DIRECT; use --direct auto or off")]
    DirectRefused { path: PathBuf, source: io::Error },
    #[error("image {path}: not a regular file or block device (raw images only)")]
    NotRegular { path: PathBuf },
    #[error(
        "image {path}: the block device is in use (mounted, or opened exclusively by another \
         holder); refusing to serve it"
    )]
    DeviceBusy { path: PathBuf },
    #[error("image {path}: is empty (0 bytes); create it first, e.g. `fallocate -l 1G {path}`")]
    Empty { path: PathBuf },
    #[error("image {path}: size {size} is not a multiple of the {block}-byte logical block size")]
    Unaligned {
        path: PathBuf,
        size: u64,
        block: u32,
    },
    #[error(
        "image {path}: locked by another process (another ublk-mirror daemon or nbd-proxy \
         export holds it); refusing to serve it twice"
    )]
    Locked { path: PathBuf },
    #[error("image {path}: cannot lock")]
    Lock { path: PathBuf, source: io::Error },
    #[error("image {path}: cannot stat")]
    Stat { path: PathBuf, source: io::Error },
}

/// An open, exclusively locked raw image.
#[derive(Debug)]
pub struct Image {
    pub file: File,
    pub path: PathBuf,
    pub size: u64,
    /// O_DIRECT is in effect.
    pub direct: bool,
    /// The smallest I/O unit the device may advertise: O_DIRECT's offset alignment, at least 512.
    pub logical_block: u32,
}

impl Image {
    /// Opens `path` read-write and close-on-exec, takes an exclusive OFD lock, and checks that it
    /// is a usable, non-empty regular file or block device whose size is whole logical blocks.
    /// A block device is opened O_EXCL (refused while mounted or held) and sized by the kernel
    /// (its inode says 0 bytes).
    pub fn open(path: &Path, mode: DirectMode) -> Result<Image, ImageError> {
        let stat_err = |source| ImageError::Stat {
            path: path.to_owned(),
            source,
        };
        let block_device = std::fs::metadata(path)
            .map(|m| m.file_type().is_block_device())
            .unwrap_or(false);
        let (file, direct) = open_file(path, mode, block_device)?;
        let meta = file.metadata().map_err(stat_err)?;
        let is_bdev = meta.file_type().is_block_device();
        if !meta.file_type().is_file() && !is_bdev {
            return Err(ImageError::NotRegular {
                path: path.to_owned(),
            });
        }
        lock_exclusive(&file).map_err(|source| match source.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) => ImageError::Locked {
                path: path.to_owned(),
            },
            _ => ImageError::Lock {
                path: path.to_owned(),
                source,
            },
        })?;
        let size = if is_bdev {
            // The device's size, as the kernel has it (BLKGETSIZE64 and SEEK_END agree).
            (&file).seek(io::SeekFrom::End(0)).map_err(stat_err)?
        } else {
            meta.len()
        };
        if size == 0 {
            return Err(ImageError::Empty {
                path: path.to_owned(),
            });
        }
        let logical_block = if direct {
            dio_offset_align(path).max(512)
        } else {
            512
        };
        // A block device takes nothing smaller than its own logical block, O_DIRECT or not.
        let logical_block = if is_bdev {
            logical_block.max(bdev_logical_block(&file))
        } else {
            logical_block
        };
        if size % u64::from(logical_block) != 0 {
            return Err(ImageError::Unaligned {
                path: path.to_owned(),
                size,
                block: logical_block,
            });
        }
        Ok(Image {
            file,
            path: path.to_owned(),
            size,
            direct,
            logical_block,
        })
    }

    /// Makes everything written so far durable; used at shutdown.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

fn open_file(
    path: &Path,
    mode: DirectMode,
    block_device: bool,
) -> Result<(File, bool), ImageError> {
    let open = |direct: bool| {
        let mut flags = libc::O_CLOEXEC;
        if block_device {
            // On a block device O_EXCL (without O_CREAT) claims it: EBUSY while mounted or held.
            flags |= libc::O_EXCL;
        }
        if direct {
            flags |= libc::O_DIRECT;
        }
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open(path)
    };
    let open_err = |source: io::Error| match source.raw_os_error() {
        Some(libc::EBUSY) if block_device => ImageError::DeviceBusy {
            path: path.to_owned(),
        },
        _ => ImageError::Open {
            path: path.to_owned(),
            source,
        },
    };
    match mode {
        DirectMode::Off => open(false).map(|f| (f, false)).map_err(open_err),
        DirectMode::On => match open(true) {
            Ok(f) => Ok((f, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Err(ImageError::DirectRefused {
                path: path.to_owned(),
                source: e,
            }),
            Err(e) => Err(open_err(e)),
        },
        DirectMode::Auto => match open(true) {
            Ok(f) => Ok((f, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                log::warn!(
                    "image {}: the filesystem refuses O_DIRECT; falling back to buffered I/O \
                     (slower, and the page cache holds a second copy of the data)",
                    path.display()
                );
                open(false).map(|f| (f, false)).map_err(open_err)
            }
            Err(e) => Err(open_err(e)),
        },
    }
}

/// A block device's logical block size (BLKSSZGET); 512 if it does not say.
fn bdev_logical_block(file: &File) -> u32 {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int to the valid pointer; the fd is an open block device.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut size) };
    if rc == 0 && size > 0 {
        size as u32
    } else {
        512
    }
}

/// `_IO(0x12, 104)`: the logical block size of a block device.
const BLKSSZGET: libc::c_ulong = 0x1268;

/// O_DIRECT's required file-offset alignment, from statx(STATX_DIOALIGN); 0 when the kernel or
/// filesystem does not say (then 512 is the conventional safe answer).
fn dio_offset_align(path: &Path) -> u32 {
    let Ok(cpath) = CString::new(path.as_os_str().as_bytes()) else {
        return 0;
    };
    // SAFETY: statx is plain old data; all-zero is valid and the kernel fills it in.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: cpath is a valid NUL-terminated string and stx a valid, writable statx buffer.
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            cpath.as_ptr(),
            0,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return 0;
    }
    stx.stx_dio_offset_align
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn image_of(len: usize) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("tempfile");
        f.write_all(&vec![0u8; len]).expect("write");
        f
    }

    #[test]
    fn opens_and_measures_a_good_image() {
        let f = image_of(1 << 20);
        let img = Image::open(f.path(), DirectMode::Auto).expect("open");
        assert_eq!(img.size, 1 << 20);
        assert!(img.logical_block >= 512 && img.logical_block.is_power_of_two());
    }

    #[test]
    fn refuses_empty_and_unaligned_images() {
        let empty = image_of(0);
        assert!(matches!(
            Image::open(empty.path(), DirectMode::Off),
            Err(ImageError::Empty { .. })
        ));
        let odd = image_of(1000);
        assert!(matches!(
            Image::open(odd.path(), DirectMode::Off),
            Err(ImageError::Unaligned { size: 1000, .. })
        ));
    }

    #[test]
    fn second_open_of_a_locked_image_is_refused() {
        let f = image_of(4096);
        let first = Image::open(f.path(), DirectMode::Off).expect("first open");
        let second = Image::open(f.path(), DirectMode::Off);
        assert!(
            matches!(second, Err(ImageError::Locked { .. })),
            "{second:?}"
        );
        drop(first);
        Image::open(f.path(), DirectMode::Off).expect("lock released with the fd");
    }

    #[test]
    fn missing_image_names_the_path() {
        let err = Image::open(Path::new("/nonexistent/x.img"), DirectMode::Auto)
            .expect_err("missing image must fail");
        assert!(err.to_string().contains("/nonexistent/x.img"), "{err}");
    }
}
