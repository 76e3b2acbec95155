//! The fallback chain: providers tried in order, with the health of each remembered across
//! requests.
//!
//! A provider that fails with overload, quota or an unreachable server
//! ([`ClaudeError::wants_fallback`]) is marked down and the next one answers; the user is told
//! ([`ModelReport::notices`]). A down provider is skipped until its back-off ends (5 s,
//! doubling up to 5 min); the first request after that probes it by trying it first again,
//! and once it answers it is used as before. A per-minute rate limit does not move the
//! request on (the provider's own retries cover it), nor does anything that fails after part
//! of the reply was delivered (the next provider would repeat it). The last provider of a
//! chain is always tried, down or not.
//!
//! Time is tokio's, so the back-off is tested with paused time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::time::Instant;

use super::claude::{ClaudeError, MessagesRequest, StreamEvent, Turn};
use super::model::{ModelClient, ModelReport};

/// First back-off after a provider fails.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(5);
/// Longest back-off.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
struct Down {
    failures: u32,
    until: Instant,
    why: String,
}

/// Which providers are down, shared by every request of the agent.
#[derive(Debug, Default)]
pub struct Health {
    down: Mutex<HashMap<String, Down>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Health {
    /// If `label` is down and its back-off has not ended: why, and how long until the probe.
    pub fn skip(&self, label: &str) -> Option<(String, Duration)> {
        let down = lock(&self.down);
        let d = down.get(label)?;
        let now = Instant::now();
        (now < d.until).then(|| (d.why.clone(), d.until - now))
    }

    /// Records a failure; returns the back-off.
    pub fn failed(&self, label: &str, why: &str) -> Duration {
        let mut down = lock(&self.down);
        let failures = down.get(label).map_or(0, |d| d.failures) + 1;
        let backoff = FIRST_BACKOFF
            .saturating_mul(1u32 << (failures - 1).min(16))
            .min(MAX_BACKOFF);
        down.insert(
            label.to_owned(),
            Down {
                failures,
                until: Instant::now() + backoff,
                why: why.to_owned(),
            },
        );
        backoff
    }

    /// Records an answer; returns whether the provider had been down.
    pub fn answered(&self, label: &str) -> bool {
        lock(&self.down).remove(label).is_some()
    }

    /// Whether `label` is marked down (whatever its back-off).
    pub fn is_down(&self, label: &str) -> bool {
        lock(&self.down).contains_key(label)
    }
}

/// One provider of a chain.
pub struct Link {
    /// `provider/model`.
    pub label: String,
    /// Its client.
    pub client: Arc<dyn ModelClient>,
}

/// A [`ModelClient`] over an ordered list of providers (see the module docs).
pub struct ChainClient {
    links: Vec<Link>,
    health: Arc<Health>,
    report: Mutex<ModelReport>,
}

impl std::fmt::Debug for ChainClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let labels: Vec<&str> = self.links.iter().map(|l| l.label.as_str()).collect();
        f.debug_struct("ChainClient")
            .field("links", &labels)
            .finish_non_exhaustive()
    }
}

impl ChainClient {
    /// A chain over `links` (tried in order), with `health` shared across requests and
    /// `notices` about providers that could not even be set up.
    pub fn new(links: Vec<Link>, health: Arc<Health>, notices: Vec<String>) -> ChainClient {
        ChainClient {
            links,
            health,
            report: Mutex::new(ModelReport {
                model: None,
                notices,
            }),
        }
    }

    /// The link the next call tries first: the first one not backing off (the last one
    /// is always tried).
    fn first(&self) -> Option<&Link> {
        let last = self.links.len().checked_sub(1)?;
        self.links
            .iter()
            .enumerate()
            .find(|(i, l)| *i == last || self.health.skip(&l.label).is_none())
            .map(|(_, l)| l)
    }

    fn notice(&self, text: String) {
        let mut r = lock(&self.report);
        if !r.notices.contains(&text) {
            r.notices.push(text);
        }
    }

    async fn run(
        &self,
        req: &MessagesRequest,
        on: &mut (dyn FnMut(StreamEvent) + Send),
    ) -> Result<Turn, ClaudeError> {
        let mut failures: Vec<String> = Vec::new();
        let last = self.links.len().saturating_sub(1);
        for (i, link) in self.links.iter().enumerate() {
            if i < last
                && let Some((why, wait)) = self.health.skip(&link.label)
            {
                failures.push(format!(
                    "{} is unavailable ({why}; tried again in {} s)",
                    link.label,
                    wait.as_secs().max(1)
                ));
                continue;
            }
            let mut delivered = false;
            let result = {
                let mut forward = |ev: StreamEvent| {
                    if matches!(
                        ev,
                        StreamEvent::TextDelta(_) | StreamEvent::ToolUseStart { .. }
                    ) {
                        delivered = true;
                    }
                    on(ev);
                };
                link.client.stream(req, &mut forward).await
            };
            match result {
                Ok(turn) => {
                    if self.health.answered(&link.label) {
                        tracing::info!(provider = %link.label, "model provider is back");
                    }
                    if !failures.is_empty() {
                        self.notice(format!(
                            "answered by {}: {}",
                            link.label,
                            failures.join("; ")
                        ));
                    }
                    lock(&self.report).model = Some(link.label.clone());
                    return Ok(turn);
                }
                Err(e) if e.wants_fallback() && !delivered && i < last => {
                    let backoff = self.health.failed(&link.label, &short(&e));
                    tracing::warn!(
                        provider = %link.label,
                        error = %e,
                        backoff_s = backoff.as_secs(),
                        "model provider failed; trying the next one"
                    );
                    failures.push(format!("{} failed: {e}", link.label));
                }
                Err(e) => {
                    if e.wants_fallback() && !delivered {
                        self.health.failed(&link.label, &short(&e));
                    }
                    if failures.is_empty() {
                        return Err(e);
                    }
                    failures.push(format!("{} failed: {e}", link.label));
                    return Err(ClaudeError::NoProvider(failures.join("; ")));
                }
            }
        }
        Err(ClaudeError::NoProvider(if failures.is_empty() {
            "no provider is configured".into()
        } else {
            failures.join("; ")
        }))
    }
}

/// A few words on why a provider is down (for the notice).
fn short(e: &ClaudeError) -> String {
    let text = e.to_string();
    match text.char_indices().nth(160) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text,
    }
}

impl ModelClient for ChainClient {
    fn stream<'a>(
        &'a self,
        req: &'a MessagesRequest,
        on: &'a mut (dyn FnMut(StreamEvent) + Send),
    ) -> BoxFuture<'a, Result<Turn, ClaudeError>> {
        Box::pin(self.run(req, on))
    }

    fn report(&self) -> ModelReport {
        lock(&self.report).clone()
    }

    fn accepts(&self) -> crate::agent::prompt_files::Accepts {
        self.first()
            .map_or(crate::agent::prompt_files::Accepts::TEXT, |l| {
                l.client.accepts()
            })
    }

    fn primary(&self) -> Option<String> {
        self.first().map(|l| l.label.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::agent::claude::{ContentBlock, StopReason, Usage};

    /// Answers with its name, or fails with a scripted error while `failing` is set.
    struct Fake {
        name: &'static str,
        failing: Mutex<Option<ClaudeError>>,
        calls: AtomicU32,
    }

    impl Fake {
        fn new(name: &'static str) -> Arc<Fake> {
            Arc::new(Fake {
                name,
                failing: Mutex::new(None),
                calls: AtomicU32::new(0),
            })
        }

        fn fail_with(&self, e: Option<ClaudeError>) {
            *lock(&self.failing) = e;
        }

        fn calls(&self) -> u32 {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl ModelClient for Fake {
        fn stream<'a>(
            &'a self,
            _req: &'a MessagesRequest,
            on: &'a mut (dyn FnMut(StreamEvent) + Send),
        ) -> BoxFuture<'a, Result<Turn, ClaudeError>> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                if let Some(e) = lock(&self.failing).clone() {
                    return Err(e);
                }
                on(StreamEvent::TextDelta(self.name.into()));
                Ok(Turn {
                    id: "m".into(),
                    content: vec![ContentBlock::text(self.name)],
                    stop_reason: StopReason::EndTurn,
                    usage: Usage::default(),
                })
            })
        }
    }

    fn chain(health: &Arc<Health>, fakes: &[&Arc<Fake>]) -> ChainClient {
        let links = fakes
            .iter()
            .map(|f| Link {
                label: format!("{}/m", f.name),
                client: Arc::clone(f) as Arc<dyn ModelClient>,
            })
            .collect();
        ChainClient::new(links, health.clone(), Vec::new())
    }

    async fn ask(c: &ChainClient) -> Result<String, ClaudeError> {
        let mut on = |_: StreamEvent| {};
        c.stream(&MessagesRequest::default(), &mut on)
            .await
            .map(|t| t.text())
    }

    #[tokio::test(start_paused = true)]
    async fn overload_falls_back_the_primary_is_probed_with_backoff_and_used_again()
    -> Result<(), ClaudeError> {
        let health = Arc::new(Health::default());
        let (primary, local) = (Fake::new("claude"), Fake::new("local"));
        primary.fail_with(Some(ClaudeError::Overloaded { attempts: 5 }));

        let c = chain(&health, &[&primary, &local]);
        assert_eq!(ask(&c).await?, "local");
        let report = c.report();
        assert_eq!(report.model.as_deref(), Some("local/m"));
        assert_eq!(report.notices.len(), 1);
        assert!(
            report.notices[0].starts_with(
                "answered by local/m: claude/m failed: the Anthropic API is overloaded"
            ),
            "{report:?}"
        );

        // Within the back-off the primary is not tried; the user is told why.
        let c = chain(&health, &[&primary, &local]);
        assert_eq!(ask(&c).await?, "local");
        assert_eq!(primary.calls(), 1);
        assert!(c.report().notices[0].contains("claude/m is unavailable"));

        // After it, the next request probes the primary: still down, so a longer back-off.
        tokio::time::advance(FIRST_BACKOFF).await;
        let c = chain(&health, &[&primary, &local]);
        assert_eq!(ask(&c).await?, "local");
        assert_eq!(primary.calls(), 2);
        tokio::time::advance(FIRST_BACKOFF).await;
        let c = chain(&health, &[&primary, &local]);
        assert_eq!(ask(&c).await?, "local");
        assert_eq!(primary.calls(), 2, "the second back-off is twice as long");

        // Back: the probe succeeds and the primary answers again, with nothing to tell.
        primary.fail_with(None);
        tokio::time::advance(FIRST_BACKOFF).await;
        let c = chain(&health, &[&primary, &local]);
        assert_eq!(ask(&c).await?, "claude");
        assert!(c.report().notices.is_empty());
        assert!(!health.is_down("claude/m"));
        let c = chain(&health, &[&primary, &local]);
        assert_eq!(ask(&c).await?, "claude");
        assert_eq!(primary.calls(), 4);
        Ok(())
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limits_and_our_own_errors_do_not_fall_back() {
        let health = Arc::new(Health::default());
        let (primary, local) = (Fake::new("claude"), Fake::new("local"));
        for e in [
            ClaudeError::RateLimited { attempts: 5 },
            ClaudeError::Auth,
            ClaudeError::BadRequest {
                status: 400,
                message: "bad".into(),
            },
        ] {
            primary.fail_with(Some(e.clone()));
            let c = chain(&health, &[&primary, &local]);
            assert_eq!(ask(&c).await.err(), Some(e));
        }
        assert_eq!(local.calls(), 0);
        assert!(!health.is_down("claude/m"));
    }

    #[tokio::test(start_paused = true)]
    async fn unreachable_and_quota_fall_back_and_all_failing_names_each() {
        let health = Arc::new(Health::default());
        let (a, b, c3) = (Fake::new("a"), Fake::new("b"), Fake::new("c"));
        a.fail_with(Some(ClaudeError::Transport("connection refused".into())));
        b.fail_with(Some(ClaudeError::Quota {
            status: 402,
            message: "no credit".into(),
        }));
        c3.fail_with(Some(ClaudeError::Server {
            status: 503,
            message: "down".into(),
            attempts: 3,
        }));
        let c = chain(&health, &[&a, &b, &c3]);
        let err = ask(&c)
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.starts_with("no model provider could answer: a/m failed"),
            "{err}"
        );
        assert!(
            err.contains("b/m failed") && err.contains("c/m failed"),
            "{err}"
        );
        // The last link is tried even while it is down.
        c3.fail_with(None);
        let c = chain(&health, &[&a, &b, &c3]);
        assert_eq!(ask(&c).await.ok().as_deref(), Some("c"));
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let h = Health::default();
        assert_eq!(h.failed("x", "down"), FIRST_BACKOFF);
        assert_eq!(h.failed("x", "down"), FIRST_BACKOFF * 2);
        for _ in 0..20 {
            h.failed("x", "down");
        }
        assert_eq!(h.failed("x", "down"), MAX_BACKOFF);
        assert!(h.answered("x"));
        assert!(!h.answered("x"));
    }
}
