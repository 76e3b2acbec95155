//! Budgets: tokens and money per UTC day and month, for the whole mesh and per asking
//! device, enforced by the agent even when runs go on at the same time.
//!
//! What was used is kept in the agent's store (`usage/{period}/{scope}`: tokens and
//! nano-dollars, big-endian), so it survives restarts. What runs going on now may still use is
//! kept as **reservations** in memory: before each model call a run reserves what the call can
//! cost at most (its estimated input plus `max_tokens` of output, at the dearest input price);
//! the reservation is checked against every budget that applies and taken in one step, under
//! one lock, so concurrent runs can never together promise more than a budget holds. When the
//! call ends its real use is recorded and the reservation released ([`Reservation::settle`]).
//! A budget is exceeded when used plus reserved plus the new reservation would pass it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::claude::{TokenBudget, Usage};
use super::clock::SharedClock;
use super::cost::{self, Price};
use crate::config::{AgentConfig, BudgetConfig};
use crate::store::Store;

/// How a refusal for an exceeded budget starts (clients classify failures by it:
/// [`FailReason`](super::ask::FailReason)).
pub const BUDGET_EXCEEDED: &str = "budget exceeded";

/// Tokens and money.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Amount {
    /// Tokens (input of every kind plus output).
    pub tokens: u64,
    /// Nano-dollars (10⁻⁹ USD).
    pub nanos: u64,
}

impl Amount {
    fn plus(self, o: Amount) -> Amount {
        Amount {
            tokens: self.tokens.saturating_add(o.tokens),
            nanos: self.nanos.saturating_add(o.nanos),
        }
    }

    fn minus(self, o: Amount) -> Amount {
        Amount {
            tokens: self.tokens.saturating_sub(o.tokens),
            nanos: self.nanos.saturating_sub(o.nanos),
        }
    }

    fn encode(self) -> Vec<u8> {
        let mut v = self.tokens.to_be_bytes().to_vec();
        v.extend(self.nanos.to_be_bytes());
        v
    }

    fn decode(bytes: Option<&[u8]>) -> Amount {
        let Some(b) = bytes else {
            return Amount::default();
        };
        let word = |r: std::ops::Range<usize>| {
            b.get(r)
                .and_then(|s| <[u8; 8]>::try_from(s).ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0)
        };
        Amount {
            tokens: word(0..8),
            nanos: word(8..16),
        }
    }
}

/// A limit in tokens and/or money; 0 means no limit of that kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Limit {
    /// Tokens; 0: unlimited.
    pub tokens: u64,
    /// Nano-dollars; 0: unlimited.
    pub nanos: u64,
}

impl Limit {
    fn is_set(&self) -> bool {
        self.tokens > 0 || self.nanos > 0
    }

    /// Which kind `amount` passes, if any.
    fn passed_by(&self, amount: Amount) -> Option<Kind> {
        if self.tokens > 0 && amount.tokens > self.tokens {
            Some(Kind::Tokens)
        } else if self.nanos > 0 && amount.nanos > self.nanos {
            Some(Kind::Money)
        } else {
            None
        }
    }

    /// Which kind `amount` has reached (used up), if any.
    fn reached_by(&self, amount: Amount) -> Option<Kind> {
        if self.tokens > 0 && amount.tokens >= self.tokens {
            Some(Kind::Tokens)
        } else if self.nanos > 0 && amount.nanos >= self.nanos {
            Some(Kind::Money)
        } else {
            None
        }
    }
}

/// A budget period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// A UTC day.
    Day,
    /// A UTC calendar month.
    Month,
}

/// Tokens or money.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A token limit.
    Tokens,
    /// A money limit.
    Money,
}

/// The budgets in force, checked and in nano-dollars.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Budgets {
    /// The whole mesh, per day.
    pub mesh_day: Limit,
    /// The whole mesh, per month.
    pub mesh_month: Limit,
    /// Each asking device, per day (unless overridden).
    pub device_day: Limit,
    /// Each asking device, per month (unless overridden).
    pub device_month: Limit,
    /// Per device (by id or name): `(day, month)` in place of the defaults.
    pub devices: BTreeMap<String, (Limit, Limit)>,
}

impl Budgets {
    /// The budgets of the `[agent]` section (`daily_token_budget` and `[agent.budget]`).
    pub fn from_config(agent: &AgentConfig) -> Budgets {
        let b: &BudgetConfig = &agent.budget;
        let limit = |tokens: u64, usd: f64| Limit {
            tokens,
            nanos: cost::nanos(usd),
        };
        let device_day = limit(b.device_daily_tokens, b.device_daily_usd);
        let device_month = limit(b.device_monthly_tokens, b.device_monthly_usd);
        Budgets {
            mesh_day: limit(agent.daily_token_budget, b.daily_usd),
            mesh_month: limit(b.monthly_tokens, b.monthly_usd),
            device_day,
            device_month,
            devices: b
                .devices
                .iter()
                .map(|(who, d)| {
                    let day = Limit {
                        tokens: d.daily_tokens.unwrap_or(device_day.tokens),
                        nanos: d.daily_usd.map_or(device_day.nanos, cost::nanos),
                    };
                    let month = Limit {
                        tokens: d.monthly_tokens.unwrap_or(device_month.tokens),
                        nanos: d.monthly_usd.map_or(device_month.nanos, cost::nanos),
                    };
                    (who.clone(), (day, month))
                })
                .collect(),
        }
    }

    /// Only a daily token budget for the mesh (0: none).
    pub fn daily_tokens(tokens: u64) -> Budgets {
        Budgets {
            mesh_day: Limit { tokens, nanos: 0 },
            ..Budgets::default()
        }
    }

    fn for_device(&self, id: &str, name: Option<&str>) -> (Limit, Limit) {
        self.devices
            .get(id)
            .or_else(|| name.and_then(|n| self.devices.get(n)))
            .copied()
            .unwrap_or((self.device_day, self.device_month))
    }
}

/// Whose budget.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase", tag = "scope", content = "device")]
pub enum Scope {
    /// The whole mesh.
    Mesh,
    /// One asking device (its id).
    Device(String),
}

/// A budget that a reservation would pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("budget exceeded: {}", self.describe())]
pub struct Exceeded {
    /// Whose budget.
    pub scope: Scope,
    /// Day or month.
    pub period: Period,
    /// Tokens or money.
    pub kind: Kind,
    /// The limit (tokens or nano-dollars).
    pub limit: u64,
    /// Used so far in the period (tokens or nano-dollars).
    pub used: u64,
}

impl Exceeded {
    fn describe(&self) -> String {
        let whose = match &self.scope {
            Scope::Mesh => "the mesh's".to_string(),
            Scope::Device(d) => format!("device {}'s", short(d)),
        };
        let (period, resets) = match self.period {
            Period::Day => ("daily", "at 00:00 UTC"),
            Period::Month => ("monthly", "on the 1st of the month (UTC)"),
        };
        let (what, amount) = match self.kind {
            Kind::Tokens => ("token", format!("{} tokens", self.limit)),
            Kind::Money => ("spending", format!("${:.2}", cost::usd(self.limit))),
        };
        let setting = match (&self.scope, self.period, self.kind) {
            (Scope::Mesh, Period::Day, Kind::Tokens) => "agent.daily_token_budget",
            (Scope::Mesh, Period::Day, Kind::Money) => "agent.budget.daily_usd",
            (Scope::Mesh, Period::Month, Kind::Tokens) => "agent.budget.monthly_tokens",
            (Scope::Mesh, Period::Month, Kind::Money) => "agent.budget.monthly_usd",
            (Scope::Device(_), Period::Day, Kind::Tokens) => "agent.budget.device_daily_tokens",
            (Scope::Device(_), Period::Day, Kind::Money) => "agent.budget.device_daily_usd",
            (Scope::Device(_), Period::Month, Kind::Tokens) => "agent.budget.device_monthly_tokens",
            (Scope::Device(_), Period::Month, Kind::Money) => "agent.budget.device_monthly_usd",
        };
        format!(
            "{whose} {period} {what} budget ({amount}) is used up; it resets {resets}, or raise \
             {setting} on the agent device"
        )
    }
}

fn short(device: &str) -> &str {
    device.get(..12).unwrap_or(device)
}

/// The UTC day number and `YYYY-MM` month of a unix time.
pub fn periods(now_secs: i64) -> (i64, String) {
    let day = now_secs.max(0) / 86_400;
    let (y, m, _) = civil_from_days(day);
    (day, format!("{y:04}-{m:02}"))
}

/// `(year, month, day)` of a day number since 1970-01-01 (H. Hinnant's algorithm).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// One budget as it stands (for `iom usage` and the page).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BudgetState {
    /// Whose.
    #[serde(flatten)]
    pub scope: Scope,
    /// Day or month.
    pub period: Period,
    /// The period (`day` number or `YYYY-MM`).
    pub key: String,
    /// The limit.
    pub limit: Limit,
    /// Used in the period.
    pub used: Amount,
    /// Reserved by runs going on now.
    pub reserved: Amount,
}

#[derive(Debug, Clone)]
struct Slot {
    key: Vec<u8>,
    scope: Scope,
    period: Period,
    limit: Limit,
}

/// The agent's record of use and its reservations. Shared by every run (`Arc`).
#[derive(Debug)]
pub struct Ledger {
    store: Store,
    clock: SharedClock,
    budgets: Budgets,
    reserved: Mutex<HashMap<Vec<u8>, Amount>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Ledger {
    /// A ledger over `store` with `budgets`.
    pub fn new(store: Store, clock: SharedClock, budgets: Budgets) -> Arc<Ledger> {
        Arc::new(Ledger {
            store,
            clock,
            budgets,
            reserved: Mutex::default(),
        })
    }

    /// The budgets in force.
    pub fn budgets(&self) -> &Budgets {
        &self.budgets
    }

    fn slots(&self, device: &str, name: Option<&str>) -> Vec<Slot> {
        let (day, month) = periods(self.clock.now_secs());
        let (dev_day, dev_month) = self.budgets.for_device(device, name);
        let dev = Scope::Device(device.to_string());
        vec![
            Slot {
                key: format!("usage/d/{day}/mesh").into_bytes(),
                scope: Scope::Mesh,
                period: Period::Day,
                limit: self.budgets.mesh_day,
            },
            Slot {
                key: format!("usage/m/{month}/mesh").into_bytes(),
                scope: Scope::Mesh,
                period: Period::Month,
                limit: self.budgets.mesh_month,
            },
            Slot {
                key: format!("usage/d/{day}/dev/{device}").into_bytes(),
                scope: dev.clone(),
                period: Period::Day,
                limit: dev_day,
            },
            Slot {
                key: format!("usage/m/{month}/dev/{device}").into_bytes(),
                scope: dev,
                period: Period::Month,
                limit: dev_month,
            },
        ]
    }

    fn used(&self, key: &[u8]) -> Amount {
        match self.store.state_get(key) {
            Ok(v) => Amount::decode(v.as_deref()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the usage ledger");
                Amount::default()
            }
        }
    }

    /// Tokens the mesh used today (UTC).
    pub fn tokens_today(&self) -> u64 {
        let (day, _) = periods(self.clock.now_secs());
        self.used(format!("usage/d/{day}/mesh").as_bytes()).tokens
    }

    /// The first budget that is used up for `device` now, if any (no reservation is made).
    pub fn exhausted(&self, device: &str, name: Option<&str>) -> Option<Exceeded> {
        let reserved = lock(&self.reserved);
        self.slots(device, name).into_iter().find_map(|s| {
            let used = self.used(&s.key);
            let held = reserved.get(&s.key).copied().unwrap_or_default();
            exceeded(&s, used, s.limit.reached_by(used.plus(held)))
        })
    }

    /// Reserves `amount` for a model call of a run for `device` (its name, if known, for the
    /// per-device settings): refused, reserving nothing, if any budget would be passed.
    pub fn reserve(
        self: &Arc<Self>,
        device: &str,
        name: Option<&str>,
        amount: Amount,
    ) -> Result<Reservation, Exceeded> {
        let mut r = Reservation {
            ledger: self.clone(),
            device: device.to_string(),
            name: name.map(str::to_string),
            held: Vec::new(),
        };
        r.extend(amount)?;
        Ok(r)
    }

    fn try_hold(&self, slots: &[Slot], amount: Amount) -> Result<(), Exceeded> {
        let mut reserved = lock(&self.reserved);
        for s in slots.iter().filter(|s| s.limit.is_set()) {
            let used = self.used(&s.key);
            let held = reserved.get(&s.key).copied().unwrap_or_default();
            if let Some(e) = exceeded(s, used, s.limit.passed_by(used.plus(held).plus(amount))) {
                return Err(e);
            }
        }
        for s in slots {
            let e = reserved.entry(s.key.clone()).or_default();
            *e = e.plus(amount);
        }
        Ok(())
    }

    fn release(&self, held: &[(Vec<u8>, Amount)]) {
        let mut reserved = lock(&self.reserved);
        for (key, amount) in held {
            if let Some(e) = reserved.get_mut(key) {
                *e = e.minus(*amount);
                if *e == Amount::default() {
                    reserved.remove(key);
                }
            }
        }
    }

    /// Adds `amount` to the use recorded under `key` (compare-and-swap, so nothing is lost).
    fn add(&self, key: &[u8], amount: Amount) {
        loop {
            let old = match self.store.state_get(key) {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the usage ledger");
                    return;
                }
            };
            let new = Amount::decode(old.as_deref()).plus(amount);
            match self
                .store
                .state_cas(key, old.as_deref(), Some(new.encode()))
            {
                Ok(true) => return,
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot record token use");
                    return;
                }
            }
        }
    }

    /// Records use without a reservation (e.g. by tests, or a run that had none).
    pub fn record(&self, device: &str, name: Option<&str>, amount: Amount) {
        let _guard = lock(&self.reserved);
        for s in self.slots(device, name) {
            self.add(&s.key, amount);
        }
    }

    /// Every budget that is set, for `device` (or the mesh's only), as it stands now.
    pub fn states(&self, device: Option<(&str, Option<&str>)>) -> Vec<BudgetState> {
        let reserved = lock(&self.reserved);
        let slots = match device {
            Some((id, name)) => self.slots(id, name),
            None => self.slots("", None).into_iter().take(2).collect(),
        };
        let (day, month) = periods(self.clock.now_secs());
        slots
            .into_iter()
            .filter(|s| s.limit.is_set())
            .map(|s| BudgetState {
                used: self.used(&s.key),
                reserved: reserved.get(&s.key).copied().unwrap_or_default(),
                key: match s.period {
                    Period::Day => day.to_string(),
                    Period::Month => month.clone(),
                },
                scope: s.scope,
                period: s.period,
                limit: s.limit,
            })
            .collect()
    }
}

fn exceeded(s: &Slot, used: Amount, kind: Option<Kind>) -> Option<Exceeded> {
    kind.map(|kind| Exceeded {
        scope: s.scope.clone(),
        period: s.period,
        kind,
        limit: match kind {
            Kind::Tokens => s.limit.tokens,
            Kind::Money => s.limit.nanos,
        },
        used: match kind {
            Kind::Tokens => used.tokens,
            Kind::Money => used.nanos,
        },
    })
}

/// Room held in every budget of one device (and the mesh) for one run's next model call.
/// Dropping it releases what is still held.
#[derive(Debug)]
pub struct Reservation {
    ledger: Arc<Ledger>,
    device: String,
    name: Option<String>,
    /// What is held, under the keys of the periods when it was taken.
    held: Vec<(Vec<u8>, Amount)>,
}

impl Reservation {
    /// What is held now.
    pub fn held(&self) -> Amount {
        self.held.first().map(|(_, a)| *a).unwrap_or_default()
    }

    /// Holds `amount` more; refused (holding nothing more) if a budget would be passed.
    pub fn extend(&mut self, amount: Amount) -> Result<(), Exceeded> {
        let slots = self.ledger.slots(&self.device, self.name.as_deref());
        self.ledger.try_hold(&slots, amount)?;
        for s in slots {
            match self.held.iter_mut().find(|(k, _)| *k == s.key) {
                Some((_, a)) => *a = a.plus(amount),
                None => self.held.push((s.key, amount)),
            }
        }
        Ok(())
    }

    /// Makes sure at least `amount` is held (holding only the difference).
    pub fn ensure(&mut self, amount: Amount) -> Result<(), Exceeded> {
        let held = self.held();
        let more = Amount {
            tokens: amount.tokens.saturating_sub(held.tokens),
            nanos: amount.nanos.saturating_sub(held.nanos),
        };
        if more == Amount::default() {
            return Ok(());
        }
        self.extend(more)
    }

    /// Records `used` (a finished model call) and releases everything held. Returns the
    /// first budget that is now used up, if any (the run should stop).
    pub fn settle(&mut self, used: Amount) -> Option<Exceeded> {
        let ledger = self.ledger.clone();
        let slots = ledger.slots(&self.device, self.name.as_deref());
        {
            // Under the reservation lock, so a concurrent reserve sees the use and the
            // release together.
            let mut reserved = lock(&ledger.reserved);
            for s in &slots {
                ledger.add(&s.key, used);
            }
            for (key, amount) in self.held.drain(..) {
                if let Some(e) = reserved.get_mut(&key) {
                    *e = e.minus(amount);
                    if *e == Amount::default() {
                        reserved.remove(&key);
                    }
                }
            }
        }
        slots.iter().find_map(|s| {
            let now = ledger.used(&s.key);
            exceeded(s, now, s.limit.reached_by(now))
        })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let held = std::mem::take(&mut self.held);
        if !held.is_empty() {
            self.ledger.release(&held);
        }
    }
}

/// What a model call of `input` input and at most `output` output tokens can use at most:
/// those tokens, and their cost at `price` with every input token at the dearest input price.
pub fn ceiling(price: Option<Price>, input: u64, output: u64) -> Amount {
    Amount {
        tokens: input.saturating_add(output),
        nanos: price.map_or(0, |p| p.ceiling_nanos(input, output)),
    }
}

/// One run's budget: its [`Reservation`], priced for the model it talks to. The tool-use loop
/// reserves before and charges after each model call through [`TokenBudget`].
#[derive(Debug)]
pub struct RunBudget {
    reservation: Mutex<Reservation>,
    price: Option<Price>,
}

impl RunBudget {
    /// A run's budget over `reservation`, for a model priced `price` (`None`: free).
    pub fn new(reservation: Reservation, price: Option<Price>) -> RunBudget {
        RunBudget {
            reservation: Mutex::new(reservation),
            price,
        }
    }

    /// What `usage` costs with this run's model, in nano-dollars.
    pub fn cost_nanos(&self, usage: &Usage) -> u64 {
        self.price.map_or(0, |p| p.cost_nanos(usage))
    }

    /// Holds room for a call (see [`TokenBudget::reserve`]), saying which budget refused.
    pub fn try_reserve(&self, input: u64, max_output: u64) -> Result<(), Exceeded> {
        lock(&self.reservation).ensure(ceiling(self.price, input, max_output))
    }
}

impl TokenBudget for RunBudget {
    fn reserve(&self, input: u64, max_output: u64) -> bool {
        self.try_reserve(input, max_output).is_ok()
    }

    fn charge(&self, usage: &Usage) -> bool {
        let used = Amount {
            tokens: usage.total(),
            nanos: self.cost_nanos(usage),
        };
        lock(&self.reservation).settle(used).is_none()
    }
}

#[cfg(test)]
mod tests;
