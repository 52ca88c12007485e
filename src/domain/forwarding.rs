//! Which of the router's forwards a partition may apply, in the order the router sent them.
//!
//! The router forwards each ingress batch into the partition queues and acks the batch only
//! once every forward is confirmed. A RabbitMQ cluster electing a new leader for a partition
//! queue can refuse (nack) one forward and accept a later one of the same batch into the same
//! queue; the router then forwards the whole batch again, so the later request would sit
//! ahead of the earlier one's second copy. To make that harmless the router stamps every
//! forward with a [`ForwardStamp`]: its epoch (new each time a router starts reading the
//! ingress queue, drawn from a PostgreSQL sequence, so a later epoch is larger) and its place
//! among that epoch's forwards into the same partition queue. A partition remembers the last
//! stamp it applied (its cursor, stored with each batch) and sets aside any forward that
//! skips one: the skipped forward was refused, so its batch was never acked and comes again,
//! in order, in a later epoch. A forward at or before the cursor (a batch delivered again
//! after its commit, or a late copy from an older epoch) is applied only as a replay of what
//! is stored: a newer epoch exists only because the older one's last batch failed and was
//! forwarded again, so a request not stored yet comes again in its place.

/// A router's stamp on one forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ForwardStamp {
    /// The router's epoch: larger for a router that started reading the ingress queue later.
    pub epoch: i64,
    /// The forward's place among its epoch's forwards into this partition queue, from 0.
    pub seq: i64,
}

/// What a partition does with one forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Apply it (a copy already applied is answered as a replay, as always).
    Apply,
    /// Ack it without applying or answering it: it skipped a forward that was refused, and
    /// its own batch comes again in a later epoch.
    SetAside,
    /// It is at or before the cursor: delivered again after its batch was applied (answer it
    /// from storage), or a late copy from an older epoch whose request a newer epoch carries.
    /// Apply it only as a replay of a stored request (or, for an invalid message, answer it
    /// again); otherwise set it aside.
    ReplayOnly,
}

/// The admission of a forward stamped `stamp` by a partition whose cursor is `cursor`, and
/// the cursor after it. An unstamped forward (a router older than stamps) is applied and
/// leaves the cursor alone; so does any forward while there is no cursor yet, which it starts.
pub fn admit(cursor: Option<ForwardStamp>, stamp: Option<ForwardStamp>) -> (Admission, Option<ForwardStamp>) {
    let (Some(cursor), Some(stamp)) = (cursor, stamp) else {
        return (Admission::Apply, cursor.or(stamp));
    };
    let next = if stamp.epoch == cursor.epoch { cursor.seq + 1 } else { 0 };
    if stamp <= cursor {
        (Admission::ReplayOnly, Some(cursor))
    } else if stamp.seq == next {
        (Admission::Apply, Some(stamp))
    } else {
        (Admission::SetAside, Some(cursor))
    }
}

/// [`admit`] over a batch's forwards in delivery order: each one's admission, and the
/// cursor after the batch.
pub fn admit_batch(
    cursor: Option<ForwardStamp>,
    stamps: impl IntoIterator<Item = Option<ForwardStamp>>,
) -> (Vec<Admission>, Option<ForwardStamp>) {
    let mut cursor = cursor;
    let admissions = stamps
        .into_iter()
        .map(|stamp| {
            let (admission, after) = admit(cursor, stamp);
            debug_assert!(after >= cursor, "a cursor never moves back");
            cursor = after;
            admission
        })
        .collect();
    (admissions, cursor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Admission::{Apply, ReplayOnly, SetAside};

    fn at(epoch: i64, seq: i64) -> Option<ForwardStamp> {
        Some(ForwardStamp { epoch, seq })
    }

    #[test]
    fn in_order_forwards_advance_the_cursor() {
        let (admissions, cursor) = admit_batch(at(7, 2), [at(7, 3), at(7, 4), at(7, 5)]);
        assert_eq!((admissions, cursor), (vec![Apply, Apply, Apply], at(7, 5)));
    }

    #[test]
    fn a_refused_forward_sets_aside_the_ones_behind_it_until_the_next_epoch() {
        // 7:3 was refused; 7:4 and 7:5 were accepted behind it; the batch comes again as 9:0…
        let (admissions, cursor) = admit_batch(at(7, 2), [at(7, 4), at(7, 5), at(9, 0), at(9, 1), at(9, 2)]);
        assert_eq!(admissions, vec![SetAside, SetAside, Apply, Apply, Apply]);
        assert_eq!(cursor, at(9, 2));
    }

    #[test]
    fn an_older_epoch_after_a_newer_one_is_only_replayed() {
        let (admissions, cursor) = admit_batch(at(9, 1), [at(7, 6), at(9, 2)]);
        assert_eq!((admissions, cursor), (vec![ReplayOnly, Apply], at(9, 2)));
    }

    #[test]
    fn a_new_epoch_must_start_at_zero() {
        assert_eq!(admit(at(7, 2), at(8, 1)), (SetAside, at(7, 2)));
        assert_eq!(admit(at(7, 2), at(8, 0)), (Apply, at(8, 0)));
    }

    #[test]
    fn a_forward_delivered_again_is_only_replayed_and_keeps_the_cursor() {
        let (admissions, cursor) = admit_batch(at(7, 5), [at(7, 3), at(7, 4), at(7, 5), at(7, 6)]);
        assert_eq!((admissions, cursor), (vec![ReplayOnly, ReplayOnly, ReplayOnly, Apply], at(7, 6)));
    }

    #[test]
    fn a_batch_delivered_again_across_epochs_is_only_replayed() {
        // 7:7, 7:8 applied, 7:10 set aside (7:9 refused), 9:0 and 9:1 applied, then the whole
        // batch came back: nothing in it may be applied anew, 9:2 (the copy of 7:9) may.
        let (admissions, cursor) = admit_batch(at(9, 1), [at(7, 7), at(7, 8), at(7, 10), at(9, 0), at(9, 1), at(9, 2)]);
        assert_eq!(admissions, vec![ReplayOnly, ReplayOnly, ReplayOnly, ReplayOnly, ReplayOnly, Apply]);
        assert_eq!(cursor, at(9, 2));
    }

    #[test]
    fn without_a_cursor_or_a_stamp_everything_is_applied() {
        assert_eq!(admit(None, at(7, 4)), (Apply, at(7, 4)));
        assert_eq!(admit(at(7, 4), None), (Apply, at(7, 4)));
        assert_eq!(admit(None, None), (Apply, None));
    }
}
