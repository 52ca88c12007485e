//! The correctness check: final balances against a model of what the approach approved.
//!
//! Concurrent clients have no defined global order, so the model is order-free: per user,
//! `opening + approved deposits - approved withdrawals` must equal the final balance
//! (otherwise an approved change was lost), and must not be negative (otherwise more was
//! paid out than the wallet ever held). All amounts are integer cents.

use std::collections::HashMap;

use serde::Serialize;

use walletq::domain::{Command, Request, UserId};

/// What the clients were told about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The request was applied.
    Approved,
    /// The request was refused.
    Rejected,
}

/// How the final state compares with the model.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Correctness {
    /// Approved withdrawals the money did not cover (fewest whose removal makes every
    /// wallet's books non-negative).
    pub overdrafts: u64,
    /// Approved requests whose effect is missing from the final balance (fewest that
    /// explain the difference; exact when amounts are equal).
    pub lost_updates: u64,
    /// Sum over users of |final balance - model balance|, in cents.
    pub discrepancy_cents: i64,
    /// Users whose final balance differs from the model or whose books are negative.
    pub users_wrong: u64,
    /// Requests whose outcome is unknown (error or no result): they are left out of the model.
    pub unknown: u64,
    /// Every final balance equals the model, none is overdrawn, and every request has a verdict.
    pub balances_correct: bool,
}

#[derive(Default)]
struct Books {
    opening: i64,
    deposits: Vec<i64>,
    withdrawals: Vec<i64>,
}

/// Compares `final_cents` (user → final balance) with the model of the approved requests.
/// `verdicts[i]` is the outcome of `requests[i]`, `None` when unknown.
pub fn check(
    opening: &[(UserId, i64)],
    requests: &[Request],
    verdicts: &[Option<Verdict>],
    final_cents: &HashMap<String, i64>,
) -> Correctness {
    let mut books: HashMap<&str, Books> =
        opening.iter().map(|(u, cents)| (u.as_str(), Books { opening: *cents, ..Books::default() })).collect();
    let mut unknown = 0;
    for (request, verdict) in requests.iter().zip(verdicts.iter().chain(std::iter::repeat(&None))) {
        match verdict {
            None => unknown += 1,
            Some(Verdict::Rejected) => {}
            Some(Verdict::Approved) => {
                let user = books.entry(request.user_id.as_str()).or_default();
                match request.command {
                    Command::Deposit { amount } => user.deposits.push(amount.cents()),
                    Command::Withdraw { amount } | Command::Capture { amount: Some(amount), .. } => {
                        user.withdrawals.push(amount.cents())
                    }
                    // A hold or release moves no money; a capture without an amount takes its
                    // whole hold, which the bench's workloads never send.
                    _ => {}
                }
            }
        }
    }

    let mut out = Correctness { unknown, ..Correctness::default() };
    for (user, books) in &mut books {
        let expected = books.opening + books.deposits.iter().sum::<i64>() - books.withdrawals.iter().sum::<i64>();
        let actual = final_cents.get(*user).copied().unwrap_or(0);
        books.withdrawals.sort_unstable_by(|a, b| b.cmp(a));
        books.deposits.sort_unstable_by(|a, b| b.cmp(a));
        if expected < 0 {
            out.overdrafts += fewest_covering(&books.withdrawals, -expected);
        }
        let difference = actual - expected;
        if difference > 0 {
            out.lost_updates += fewest_covering(&books.withdrawals, difference);
        } else if difference < 0 {
            out.lost_updates += fewest_covering(&books.deposits, -difference);
        }
        out.discrepancy_cents += difference.abs();
        if difference != 0 || expected < 0 {
            out.users_wrong += 1;
        }
    }
    out.balances_correct = out.users_wrong == 0 && out.unknown == 0;
    out
}

/// How many of `amounts` (sorted largest first) it takes to reach `target`; when even all
/// of them fall short, one more stands for the money nobody asked for.
fn fewest_covering(amounts: &[i64], target: i64) -> u64 {
    let mut covered = 0;
    for (taken, amount) in amounts.iter().enumerate() {
        if covered >= target {
            return taken as u64;
        }
        covered += amount;
    }
    amounts.len() as u64 + u64::from(covered < target)
}

#[cfg(test)]
mod tests {
    use super::*;
    use walletq::domain::{Money, RequestId};

    fn withdraw(i: usize, user: &str, cents: i64) -> Request {
        let amount = Money::from_cents(cents).unwrap();
        Request::new(
            RequestId::parse(&format!("r{i}")).unwrap(),
            UserId::parse(user).unwrap(),
            Command::Withdraw { amount },
        )
    }

    fn deposit(i: usize, user: &str, cents: i64) -> Request {
        let amount = Money::from_cents(cents).unwrap();
        Request { command: Command::Deposit { amount }, ..withdraw(i, user, cents) }
    }

    fn finals(pairs: &[(&str, i64)]) -> HashMap<String, i64> {
        pairs.iter().map(|(u, c)| (u.to_string(), *c)).collect()
    }

    fn opening(user: &str, cents: i64) -> Vec<(UserId, i64)> {
        vec![(UserId::parse(user).unwrap(), cents)]
    }

    #[test]
    fn a_correct_run_is_correct() {
        let requests: Vec<_> = (0..4).map(|i| withdraw(i, "a", 100)).collect();
        let verdicts =
            [Some(Verdict::Approved), Some(Verdict::Approved), Some(Verdict::Rejected), Some(Verdict::Rejected)];
        let result = check(&opening("a", 200), &requests, &verdicts, &finals(&[("a", 0)]));
        assert_eq!(result, Correctness { balances_correct: true, ..Correctness::default() });
    }

    #[test]
    fn the_naive_race_shows_lost_updates_and_overdrafts() {
        // Opening 2.00, five withdrawals of 1.00 all approved, the last writer left 0.00.
        let requests: Vec<_> = (0..5).map(|i| withdraw(i, "a", 100)).collect();
        let verdicts = [Some(Verdict::Approved); 5];
        let result = check(&opening("a", 200), &requests, &verdicts, &finals(&[("a", 0)]));
        assert_eq!(result.overdrafts, 3);
        assert_eq!(result.lost_updates, 3);
        assert_eq!(result.discrepancy_cents, 300);
        assert_eq!(result.users_wrong, 1);
        assert!(!result.balances_correct);
    }

    #[test]
    fn a_lost_write_without_overdraft_is_a_lost_update() {
        let requests = vec![withdraw(0, "a", 100), withdraw(1, "a", 100), deposit(2, "a", 500)];
        let verdicts = [Some(Verdict::Approved); 3];
        // Model: 1000 - 200 + 500 = 1300; one withdrawal was overwritten.
        let lost_debit = check(&opening("a", 1_000), &requests, &verdicts, &finals(&[("a", 1_400)]));
        assert_eq!((lost_debit.overdrafts, lost_debit.lost_updates), (0, 1));
        // The deposit was overwritten.
        let lost_credit = check(&opening("a", 1_000), &requests, &verdicts, &finals(&[("a", 800)]));
        assert_eq!((lost_credit.overdrafts, lost_credit.lost_updates), (0, 1));
    }

    #[test]
    fn unknown_outcomes_make_the_run_unverifiable() {
        let requests = vec![withdraw(0, "a", 100)];
        let result = check(&opening("a", 100), &requests, &[None], &finals(&[("a", 100)]));
        assert_eq!(result.unknown, 1);
        assert_eq!(result.users_wrong, 0);
        assert!(!result.balances_correct);
    }

    #[test]
    fn money_from_nowhere_is_counted() {
        assert_eq!(fewest_covering(&[], 5), 1);
        assert_eq!(fewest_covering(&[300, 100], 350), 2);
        assert_eq!(fewest_covering(&[300, 100], 500), 3);
        assert_eq!(fewest_covering(&[300, 100], 0), 0);
    }

    #[test]
    fn an_approved_capture_is_a_withdrawal_and_a_hold_moves_nothing() {
        let amount = Money::from_cents(300).unwrap();
        let id = |text: &str| RequestId::parse(text).unwrap();
        let user = UserId::parse("u").unwrap();
        let hold = Command::Hold { amount, timeout_s: 60 };
        let capture = Command::Capture { hold_id: id("h"), amount: Some(amount) };
        let requests = vec![Request::new(id("h"), user.clone(), hold), Request::new(id("c"), user.clone(), capture)];
        let verdicts = [Some(Verdict::Approved), Some(Verdict::Approved)];
        let opening = [(user, 1_000)];
        let right = HashMap::from([("u".to_owned(), 700)]);
        assert!(check(&opening, &requests, &verdicts, &right).balances_correct);
        let wrong = HashMap::from([("u".to_owned(), 1_000)]);
        assert_eq!(check(&opening, &requests, &verdicts, &wrong).lost_updates, 1);
    }
}
