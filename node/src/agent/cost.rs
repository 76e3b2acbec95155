//! What model calls cost: a price table per model, in US dollars per million tokens, and the
//! cost of a [`Usage`] in nano-dollars (integers, so totals add up exactly in counters).
//!
//! The table starts with the published prices of the current Claude models ([`DEFAULTS`]);
//! `[prices."MODEL"]` sections of the config add models or replace these. A model name is
//! matched exactly first, then by the longest known prefix (so `claude-sonnet-4-5-20250929`
//! is priced as `claude-sonnet-4-5`). A model the table does not know (a local model, say)
//! costs nothing, but its tokens are still counted.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::claude::Usage;

/// Nano-dollars in a dollar.
pub const NANOS_PER_USD: f64 = 1e9;

/// Prices of one model, in US dollars per million tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Plain input tokens.
    pub input: f64,
    /// Output tokens.
    pub output: f64,
    /// Input tokens written to the prompt cache (5-minute cache: 1.25 × input).
    #[serde(default)]
    pub cache_write: f64,
    /// Input tokens read from the prompt cache (0.1 × input).
    #[serde(default)]
    pub cache_read: f64,
}

impl Price {
    /// Prices with the usual cache factors (writes 1.25 ×, reads 0.1 × the input price).
    pub const fn claude(input: f64, output: f64) -> Price {
        Price {
            input,
            output,
            cache_write: input * 1.25,
            cache_read: input * 0.1,
        }
    }

    /// What `usage` costs, in nano-dollars (a price per million tokens is micro-dollars per
    /// token, so one token at `p` costs `p × 1000` nano-dollars).
    pub fn cost_nanos(&self, usage: &Usage) -> u64 {
        let nanos = |tokens: u64, per_million: f64| -> f64 {
            if per_million.is_finite() && per_million > 0.0 {
                tokens as f64 * per_million * 1000.0
            } else {
                0.0
            }
        };
        let total = nanos(usage.input_tokens, self.input)
            + nanos(usage.output_tokens, self.output)
            + nanos(usage.cache_creation_input_tokens, self.cache_write)
            + nanos(usage.cache_read_input_tokens, self.cache_read);
        // `as` saturates at the bounds and maps NaN to 0.
        total.round() as u64
    }

    /// The most a call with `input` input tokens and `output` output tokens can cost (every
    /// input token at the dearer of the input and cache-write prices), in nano-dollars.
    pub fn ceiling_nanos(&self, input: u64, output: u64) -> u64 {
        let dearest = Price {
            input: self.input.max(self.cache_write),
            ..*self
        };
        dearest.cost_nanos(&Usage::new(input, output))
    }
}

/// Published prices of the current Claude models (USD per million tokens).
pub const DEFAULTS: &[(&str, Price)] = &[
    ("claude-opus-4-5", Price::claude(5.0, 25.0)),
    ("claude-opus-4-1", Price::claude(15.0, 75.0)),
    ("claude-opus-4", Price::claude(15.0, 75.0)),
    ("claude-sonnet-4-5", Price::claude(3.0, 15.0)),
    ("claude-sonnet-4", Price::claude(3.0, 15.0)),
    ("claude-3-7-sonnet", Price::claude(3.0, 15.0)),
    ("claude-haiku-4-5", Price::claude(1.0, 5.0)),
    ("claude-3-5-haiku", Price::claude(0.8, 4.0)),
    ("claude-3-haiku", Price::claude(0.25, 1.25)),
];

/// Prices by model name.
#[derive(Debug, Clone, PartialEq)]
pub struct PriceTable {
    prices: BTreeMap<String, Price>,
}

impl Default for PriceTable {
    /// The [`DEFAULTS`].
    fn default() -> Self {
        PriceTable {
            prices: DEFAULTS.iter().map(|(m, p)| (m.to_string(), *p)).collect(),
        }
    }
}

impl PriceTable {
    /// The defaults with `overrides` added (an override replaces a default of the same name).
    pub fn with_overrides(overrides: &BTreeMap<String, Price>) -> PriceTable {
        let mut table = PriceTable::default();
        for (model, price) in overrides {
            table.prices.insert(model.clone(), *price);
        }
        table
    }

    /// The price of `model`: exact name, else the longest known prefix; `None` for a model
    /// the table does not know (it costs nothing).
    pub fn price(&self, model: &str) -> Option<Price> {
        if let Some(p) = self.prices.get(model) {
            return Some(*p);
        }
        self.prices
            .iter()
            .filter(|(name, _)| model.starts_with(name.as_str()))
            .max_by_key(|(name, _)| name.len())
            .map(|(_, p)| *p)
    }

    /// What `usage` of `model` costs, in nano-dollars (0 for an unknown model).
    pub fn cost_nanos(&self, model: &str, usage: &Usage) -> u64 {
        self.price(model).map_or(0, |p| p.cost_nanos(usage))
    }

    /// Every entry, by name.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Price)> {
        self.prices.iter().map(|(m, p)| (m.as_str(), p))
    }
}

/// Nano-dollars as dollars.
pub fn usd(nanos: u64) -> f64 {
    nanos as f64 / NANOS_PER_USD
}

/// Dollars (from the config) as nano-dollars; negative or not finite: 0.
pub fn nanos(usd: f64) -> u64 {
    if usd.is_finite() && usd > 0.0 {
        (usd * NANOS_PER_USD).round() as u64
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_every_kind_of_token() {
        let table = PriceTable::default();
        let usage = Usage {
            input_tokens: 1_000_000,
            output_tokens: 1_000_000,
            cache_creation_input_tokens: 1_000_000,
            cache_read_input_tokens: 1_000_000,
        };
        // Sonnet 4.5: 3 + 15 + 3.75 + 0.30 dollars.
        assert_eq!(
            table.cost_nanos("claude-sonnet-4-5", &usage),
            nanos(3.0 + 15.0 + 3.75 + 0.3)
        );
        // A dated name is priced by its prefix; the longest prefix wins.
        assert_eq!(
            table.price("claude-opus-4-1-20250805"),
            table.price("claude-opus-4-1")
        );
        assert_eq!(
            table.price("claude-opus-4-5-20251101").map(|p| p.input),
            Some(5.0)
        );
        // One token of Haiku 4.5 output: 5 micro-dollars.
        assert_eq!(
            table.cost_nanos("claude-haiku-4-5", &Usage::new(0, 1)),
            5_000
        );
        // Local and unknown models cost nothing.
        assert_eq!(table.cost_nanos("smollm2-135m", &usage), 0);
        assert_eq!(table.price("llama"), None);
    }

    #[test]
    fn overrides_replace_and_add() {
        let mut o = BTreeMap::new();
        o.insert("claude-sonnet-4-5".to_string(), Price::claude(1.0, 2.0));
        o.insert(
            "local/qwen".to_string(),
            Price {
                input: 0.5,
                output: 0.5,
                cache_write: 0.0,
                cache_read: 0.0,
            },
        );
        let t = PriceTable::with_overrides(&o);
        assert_eq!(
            t.cost_nanos("claude-sonnet-4-5", &Usage::new(1_000_000, 0)),
            nanos(1.0)
        );
        assert_eq!(
            t.cost_nanos("local/qwen", &Usage::new(2_000_000, 0)),
            nanos(1.0)
        );
        assert!(t.entries().count() > DEFAULTS.len());
        // The ceiling prices input at the dearer cache-write price.
        let p = Price::claude(4.0, 0.0);
        assert_eq!(p.ceiling_nanos(1_000_000, 0), nanos(5.0));
        // Bad prices cost nothing rather than overflowing.
        let bad = Price {
            input: f64::NAN,
            output: -1.0,
            cache_write: f64::INFINITY,
            cache_read: 0.0,
        };
        assert_eq!(bad.cost_nanos(&Usage::new(10, 10)), 0);
        assert_eq!(nanos(-3.0), 0);
        assert!((usd(nanos(1.25)) - 1.25).abs() < 1e-12);
    }
}
