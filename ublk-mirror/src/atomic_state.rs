//! Small state enums kept in an `AtomicU8` so any thread reads them without a lock (the pause
//! gate, a mirror's state, a copy's state). [`u8_state!`] declares one with its code and the
//! name the control protocol and the logs show; [`AtomicState`] stores it. One place for the
//! u8 encoding both ways, instead of a hand-written match per enum.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU8, Ordering};

/// An enum with a u8 code per variant (see [`u8_state!`]).
pub trait U8State: Copy {
    fn code(self) -> u8;
    /// The variant of `code`; codes are only ever stored from `code()`, so an unknown one is
    /// a bug, answered with the enum's last variant.
    fn from_code(code: u8) -> Self;
}

/// `u8_state! { /// doc  pub enum Name { /// doc  Variant = 1 => "name", ... } }`
macro_rules! u8_state {
    ($(#[$meta:meta])* $vis:vis enum $name:ident {
        $($(#[$vmeta:meta])* $var:ident = $code:literal => $text:literal,)+
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(u8)]
        $vis enum $name {
            $($(#[$vmeta])* $var = $code,)+
        }

        impl $name {
            /// The name the control protocol and the logs use.
            pub fn name(self) -> &'static str {
                match self {
                    $($name::$var => $text,)+
                }
            }
        }

        impl $crate::atomic_state::U8State for $name {
            fn code(self) -> u8 {
                self as u8
            }
            fn from_code(code: u8) -> Self {
                const ALL: &[$name] = &[$($name::$var),+];
                ALL.iter()
                    .copied()
                    .find(|v| *v as u8 == code)
                    .unwrap_or(ALL[ALL.len() - 1])
            }
        }
    };
}
pub(crate) use u8_state;

/// One [`U8State`] value shared between threads; every access is SeqCst.
pub struct AtomicState<T> {
    code: AtomicU8,
    _kind: PhantomData<T>,
}

impl<T: U8State> AtomicState<T> {
    pub fn new(state: T) -> Self {
        AtomicState {
            code: AtomicU8::new(state.code()),
            _kind: PhantomData,
        }
    }

    pub fn load(&self) -> T {
        T::from_code(self.code.load(Ordering::SeqCst))
    }

    pub fn store(&self, state: T) {
        self.code.store(state.code(), Ordering::SeqCst);
    }

    /// Stores `state`; returns the one before.
    pub fn swap(&self, state: T) -> T {
        T::from_code(self.code.swap(state.code(), Ordering::SeqCst))
    }

    /// Moves from `from` to `to`; false (and no change) if the state was not `from`.
    pub fn transition(&self, from: T, to: T) -> bool {
        self.code
            .compare_exchange(from.code(), to.code(), Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    u8_state! {
        /// A test enum.
        enum Light {
            Red = 1 => "red",
            /// Documented variant.
            Green = 2 => "green",
        }
    }

    #[test]
    fn codes_names_and_transitions() {
        let s = AtomicState::new(Light::Red);
        assert_eq!((s.load(), s.load().name()), (Light::Red, "red"));
        assert!(
            !s.transition(Light::Green, Light::Red),
            "not green: no change"
        );
        assert!(s.transition(Light::Red, Light::Green));
        assert_eq!(s.swap(Light::Red), Light::Green);
        assert_eq!(
            Light::from_code(9),
            Light::Green,
            "unknown: the last variant"
        );
    }
}
