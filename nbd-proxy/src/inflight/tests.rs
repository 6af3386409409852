use super::*;

fn reply(cookie: u64, error: u32) -> SimpleReply {
    SimpleReply { error, cookie }
}

#[test]
fn a_reply_hands_its_value_back_once() {
    let mut t: Inflight<&str> = Inflight::new(4);
    t.insert(7, 4096, "read").expect("insert");
    t.insert(8, 0, "write").expect("insert");
    assert_eq!(t.get(7), Some(&"read"));
    let done = t.complete(&reply(7, 0)).expect("complete");
    assert_eq!((done.value, done.data_len), ("read", 4096));
    // Once only: the same reply again is a server's protocol error.
    assert_eq!(t.complete(&reply(7, 0)), Err(ProtoError::UnknownCookie(7)));
    assert_eq!(t.len(), 1);
}

#[test]
fn a_failed_read_carries_no_data() {
    let mut t: Inflight = Inflight::new(1);
    t.insert(1, 512, ()).expect("insert");
    assert_eq!(t.complete(&reply(1, 5)).expect("complete").data_len, 0);
}

#[test]
fn an_unknown_cookie_leaves_the_table_alone() {
    let mut t: Inflight<u32> = Inflight::new(2);
    t.insert(1, 0, 10).expect("insert");
    assert_eq!(t.complete(&reply(2, 0)), Err(ProtoError::UnknownCookie(2)));
    assert_eq!((t.len(), t.get(1)), (1, Some(&10)));
}

#[test]
fn a_refused_insert_hands_the_value_back() {
    let mut t: Inflight<Vec<u8>> = Inflight::new(2);
    t.insert(1, 0, vec![1]).expect("insert");
    let dup = t.insert(1, 0, vec![2]).expect_err("duplicate");
    assert_eq!(
        (dup.error, dup.value),
        (InflightError::DuplicateCookie(1), vec![2])
    );
    t.insert(2, 0, vec![3]).expect("insert");
    let full = t.insert(3, 0, vec![4]).expect_err("full");
    assert_eq!((full.error, full.value), (InflightError::Full(2), vec![4]));
    assert_eq!((t.len(), t.limit()), (2, 2));
    // The first value was not replaced by the refused duplicate.
    assert_eq!(t.get(1), Some(&vec![1]));
}

#[test]
fn the_oldest_is_the_first_still_in_flight() {
    let mut t: Inflight<char> = Inflight::new(8);
    assert_eq!(t.oldest(), None);
    for (cookie, v) in [(30, 'a'), (10, 'b'), (20, 'c')] {
        t.insert(cookie, 0, v).expect("insert");
    }
    let (cookie, sent) = t.oldest().expect("oldest");
    assert_eq!(cookie, 30);
    t.complete(&reply(30, 0)).expect("complete");
    let (cookie, later) = t.oldest().expect("oldest");
    assert_eq!(cookie, 10);
    assert!(later >= sent);
}

#[test]
fn drain_hands_back_everything_oldest_first() {
    let mut t: Inflight<u8> = Inflight::new(8);
    for (cookie, v) in [(5, 1), (3, 2), (9, 3)] {
        t.insert(cookie, 0, v).expect("insert");
    }
    t.complete(&reply(3, 0)).expect("complete");
    assert_eq!(t.drain(), vec![(5, 1), (9, 3)]);
    assert!(t.is_empty());
    assert_eq!(t.oldest(), None);
    // The table is usable again, cookies included.
    t.insert(5, 0, 4).expect("reuse");
}
