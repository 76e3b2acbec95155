//! Ledger unit tests: a real store in a temp dir, a manual clock.

#![allow(clippy::unwrap_used)]

use super::*;
use crate::agent::clock::{Clock, ManualClock};

fn ledger(budgets: Budgets, now: i64) -> (tempfile::TempDir, Arc<Ledger>, Arc<ManualClock>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db"), 1 << 20).unwrap();
    let clock = ManualClock::new(now);
    (dir, Ledger::new(store, clock.clone(), budgets), clock)
}

fn tokens(n: u64) -> Amount {
    Amount {
        tokens: n,
        nanos: 0,
    }
}

#[test]
fn reservations_count_until_settled_or_dropped() {
    let (_dir, l, _) = ledger(Budgets::daily_tokens(100), 86_400 * 10);
    let a = l.reserve("d1", None, tokens(60)).unwrap();
    // 60 held: 50 more would pass 100.
    let e = l.reserve("d2", None, tokens(50)).unwrap_err();
    assert_eq!(
        (e.scope.clone(), e.period, e.kind),
        (Scope::Mesh, Period::Day, Kind::Tokens)
    );
    assert_eq!((e.limit, e.used), (100, 0));
    let b = l.reserve("d2", None, tokens(40)).unwrap();
    drop(a);
    // Released: room again.
    let mut c = l.reserve("d3", None, tokens(60)).unwrap();
    assert_eq!(c.held(), tokens(60));
    // Settling records the real use and frees the rest.
    assert_eq!(c.settle(tokens(10)), None);
    assert_eq!(l.tokens_today(), 10);
    assert_eq!(c.held(), Amount::default());
    drop(b);
    assert_eq!(l.states(None)[0].reserved, Amount::default());
    assert_eq!(l.states(None)[0].used, tokens(10));
    // Using it all up says so, and then even an empty reservation is refused.
    let mut d = l.reserve("d1", None, tokens(90)).unwrap();
    let used_up = d.settle(tokens(90)).unwrap();
    assert!(
        used_up
            .to_string()
            .starts_with("budget exceeded: the mesh's daily token budget (100 tokens) is used up")
    );
    assert!(l.exhausted("d9", None).is_some());
    assert!(d.ensure(tokens(1)).is_err());
}

#[test]
fn concurrent_reservations_never_promise_more_than_the_budget() {
    let (_dir, l, _) = ledger(Budgets::daily_tokens(1_000), 5);
    let granted = std::sync::atomic::AtomicU64::new(0);
    let held: Vec<Vec<Reservation>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let (l, granted) = (l.clone(), &granted);
                s.spawn(move || {
                    let mut held = Vec::new();
                    for _ in 0..50 {
                        if let Ok(r) = l.reserve(&format!("d{t}"), None, tokens(7)) {
                            granted.fetch_add(7, std::sync::atomic::Ordering::SeqCst);
                            held.push(r);
                        }
                    }
                    held
                })
            })
            .collect();
        // Every thread's reservations are kept until all have tried.
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(held.iter().map(Vec::len).sum::<usize>(), 142);
    // 142 reservations of 7 fit 1,000; the rest were refused, whatever the interleaving.
    assert_eq!(granted.into_inner(), 142 * 7);
}

#[test]
fn months_devices_and_money() {
    // 2026-01-31 23:00 UTC.
    let jan31 = 20_484 * 86_400 + 23 * 3600;
    assert_eq!(periods(jan31), (20_484, "2026-01".to_string()));
    let mut budgets = Budgets {
        mesh_month: Limit {
            tokens: 0,
            nanos: cost::nanos(1.0),
        },
        device_day: Limit {
            tokens: 50,
            nanos: 0,
        },
        ..Budgets::default()
    };
    budgets.devices.insert(
        "Phone".into(),
        (
            Limit {
                tokens: 500,
                nanos: 0,
            },
            Limit::default(),
        ),
    );
    let (_dir, l, clock) = ledger(budgets, jan31);
    // A device's own daily limit, by default and by name.
    let e = l.reserve("laptop-id", None, tokens(60)).unwrap_err();
    assert_eq!(e.scope, Scope::Device("laptop-id".into()));
    assert!(
        e.to_string().contains("agent.budget.device_daily_tokens"),
        "{e}"
    );
    assert!(l.reserve("phone-id", Some("Phone"), tokens(60)).is_ok());
    // Money for the month: 90 cents used, a 20-cent call does not fit.
    let dollars = |usd: f64| Amount {
        tokens: 1,
        nanos: cost::nanos(usd),
    };
    l.record("phone-id", Some("Phone"), dollars(0.9));
    let e = l
        .reserve("phone-id", Some("Phone"), dollars(0.2))
        .unwrap_err();
    assert_eq!((e.period, e.kind), (Period::Month, Kind::Money));
    assert!(
        e.to_string().contains("monthly spending budget ($1.00)"),
        "{e}"
    );
    assert!(e.to_string().contains("on the 1st of the month"), "{e}");
    // An hour later it is February: a new month and a new day.
    clock.advance(3600);
    assert_eq!(periods(clock.now_secs()).1, "2026-02");
    assert!(l.reserve("phone-id", Some("Phone"), dollars(0.2)).is_ok());
    assert_eq!(l.tokens_today(), 0);
    let states = l.states(Some(("laptop-id", None)));
    assert_eq!(
        states
            .iter()
            .map(|s| (s.scope.clone(), s.period))
            .collect::<Vec<_>>(),
        [
            (Scope::Mesh, Period::Month),
            (Scope::Device("laptop-id".into()), Period::Day)
        ]
    );
}

#[test]
fn calendar_dates() {
    assert_eq!(civil_from_days(0), (1970, 1, 1));
    assert_eq!(civil_from_days(59), (1970, 3, 1));
    assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    assert_eq!(civil_from_days(20_423), (2025, 12, 1));
    assert_eq!(periods(-5), (0, "1970-01".to_string()));
    assert_eq!(Amount::decode(Some(&[1, 2])), Amount::default());
    assert_eq!(Amount::decode(Some(&tokens(7).encode())), tokens(7));
}
