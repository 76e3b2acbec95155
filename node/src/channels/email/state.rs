//! What the email channel keeps in the node's state tree (sled), so every mail is handled
//! once across restarts: the mailbox position (UIDVALIDITY and the last UID handled), the
//! thread map (Message-ID → conversation), the answers still to send, the answers sent and
//! the recent answer times per thread (the rate limit).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::{Store, StoreError};

const MAILBOX_KEY: &str = "email/mailbox";
const THREAD_PREFIX: &str = "email/thread/";
const JOB_PREFIX: &str = "email/job/";
const SENT_PREFIX: &str = "email/sent/";
const RATE_PREFIX: &str = "email/rate/";
/// The rate limit's window.
pub const RATE_WINDOW_SECS: u64 = 3600;

/// Where the watcher stands in the mailbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// The mailbox's UIDVALIDITY when `last_uid` was recorded.
    pub uid_validity: u32,
    /// The highest UID handled.
    pub last_uid: u32,
}

/// An answer to send: recorded before the request is asked, removed once the mail is sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// The request id (derived from the mail, see [`request_id`]).
    pub rid: String,
    /// The conversation (document id).
    pub conversation: String,
    /// The prompt asked.
    pub prompt: String,
    /// Where the answer goes (the allowlisted sender).
    pub to: String,
    /// Subject of the answer.
    pub subject: String,
    /// The mail answered (`In-Reply-To`).
    pub in_reply_to: Option<String>,
    /// The thread's ids (`References`).
    pub references: Vec<String>,
    /// The answer's Message-ID (deterministic: [`answer_id`]).
    pub answer_id: String,
    /// Unix seconds the mail was received.
    pub received_at: u64,
    /// SMTP attempts so far.
    #[serde(default)]
    pub attempts: u32,
    /// Why the last attempt failed.
    #[serde(default)]
    pub last_error: Option<String>,
}

/// The request id of a mail: from its Message-ID, or, without one, from where it is in the
/// mailbox. The same mail always gets the same id, so a mail seen twice is asked once.
pub fn request_id(message_id: Option<&str>, uid_validity: u32, uid: u32) -> String {
    let mut h = Sha256::new();
    match message_id {
        Some(id) => h.update(format!("mid:{id}")),
        None => h.update(format!("uid:{uid_validity}:{uid}")),
    }
    format!("em-{}", &hex::encode(h.finalize())[..24])
}

/// The Message-ID of the answer to request `rid`.
pub fn answer_id(rid: &str, domain: &str) -> String {
    format!("iom-{rid}@{domain}")
}

/// The channel's durable state.
#[derive(Debug, Clone)]
pub struct EmailState {
    store: Store,
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

fn key(prefix: &str, k: &str) -> Vec<u8> {
    format!("{prefix}{k}").into_bytes()
}

impl EmailState {
    /// The state in `store`.
    pub fn new(store: Store) -> Self {
        EmailState { store }
    }

    /// Makes every write so far durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.store.flush().await
    }

    /// The recorded mailbox position.
    pub fn position(&self) -> Result<Option<Position>, StoreError> {
        Ok(self
            .store
            .state_get(MAILBOX_KEY.as_bytes())?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Records the mailbox position (durable after [`EmailState::flush`]).
    pub fn set_position(&self, p: Position) -> Result<(), StoreError> {
        self.store.state_put(MAILBOX_KEY.as_bytes(), &json(&p))
    }

    /// The conversation of a message id.
    pub fn thread(&self, message_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .store
            .state_get(&key(THREAD_PREFIX, message_id))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// The conversation of the first of `ids` that is known.
    pub fn find_thread(&self, ids: &[&str]) -> Result<Option<String>, StoreError> {
        for id in ids {
            if let Some(c) = self.thread(id)? {
                return Ok(Some(c));
            }
        }
        Ok(None)
    }

    /// Maps a message id to a conversation.
    pub fn set_thread(&self, message_id: &str, conversation: &str) -> Result<(), StoreError> {
        self.store
            .state_put(&key(THREAD_PREFIX, message_id), conversation.as_bytes())
    }

    /// Records an answer to send.
    pub fn put_job(&self, job: &Job) -> Result<(), StoreError> {
        self.store.state_put(&key(JOB_PREFIX, &job.rid), &json(job))
    }

    /// An answer still to send.
    pub fn job(&self, rid: &str) -> Result<Option<Job>, StoreError> {
        Ok(self
            .store
            .state_get(&key(JOB_PREFIX, rid))?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Every answer still to send.
    pub fn jobs(&self) -> Result<Vec<Job>, StoreError> {
        Ok(self
            .store
            .state_scan(JOB_PREFIX.as_bytes())?
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
            .collect())
    }

    /// Whether the answer to `rid` was sent.
    pub fn was_sent(&self, rid: &str) -> Result<bool, StoreError> {
        Ok(self.store.state_get(&key(SENT_PREFIX, rid))?.is_some())
    }

    /// Records that the answer to `job` went out: the job is removed, the answer joins the
    /// thread and counts toward the rate limit. Durable when this returns.
    pub async fn sent(&self, job: &Job, now: u64) -> Result<(), StoreError> {
        self.store
            .state_put(&key(SENT_PREFIX, &job.rid), now.to_string().as_bytes())?;
        self.set_thread(&job.answer_id, &job.conversation)?;
        let mut times = self.answer_times(&job.conversation, now)?;
        times.push(now);
        self.store
            .state_put(&key(RATE_PREFIX, &job.conversation), &json(&times))?;
        self.store.state_remove(&key(JOB_PREFIX, &job.rid))?;
        self.flush().await
    }

    /// Answer times in a conversation within the rate window before `now`.
    pub fn answer_times(&self, conversation: &str, now: u64) -> Result<Vec<u64>, StoreError> {
        let times: Vec<u64> = self
            .store
            .state_get(&key(RATE_PREFIX, conversation))?
            .and_then(|v| serde_json::from_slice(&v).ok())
            .unwrap_or_default();
        Ok(times
            .into_iter()
            .filter(|t| now.saturating_sub(*t) < RATE_WINDOW_SECS)
            .collect())
    }

    /// Answers pending or sent recently in a conversation (what the rate limit counts).
    pub fn recent_answers(&self, conversation: &str, now: u64) -> Result<u32, StoreError> {
        let pending = self
            .jobs()?
            .iter()
            .filter(|j| j.conversation == conversation)
            .count();
        let sent = self.answer_times(conversation, now)?.len();
        Ok(u32::try_from(pending + sent).unwrap_or(u32::MAX))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn job(rid: &str, conv: &str) -> Job {
        Job {
            rid: rid.into(),
            conversation: conv.into(),
            prompt: "p".into(),
            to: "a@x.org".into(),
            subject: "Re: s".into(),
            in_reply_to: Some("m1@x.org".into()),
            references: vec!["m1@x.org".into()],
            answer_id: answer_id(rid, "x.org"),
            received_at: 1,
            attempts: 0,
            last_error: None,
        }
    }

    #[tokio::test]
    async fn state_survives_a_reopen_and_counts_answers() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = EmailState::new(Store::open(dir.path(), 1 << 20).unwrap());
            s.set_position(Position {
                uid_validity: 7,
                last_uid: 42,
            })
            .unwrap();
            s.set_thread("m1@x.org", "c1").unwrap();
            s.put_job(&job("r1", "c1")).unwrap();
            s.put_job(&job("r2", "c1")).unwrap();
            s.flush().await.unwrap();
            assert_eq!(s.recent_answers("c1", 100).unwrap(), 2);
            s.sent(&job("r1", "c1"), 100).await.unwrap();
        }
        let s = EmailState::new(Store::open(dir.path(), 1 << 20).unwrap());
        assert_eq!(s.position().unwrap().unwrap().last_uid, 42);
        assert_eq!(s.jobs().unwrap().len(), 1);
        assert!(s.was_sent("r1").unwrap());
        assert!(!s.was_sent("r2").unwrap());
        // The answer joined the thread: a reply to it finds the conversation.
        let answer = answer_id("r1", "x.org");
        assert_eq!(
            s.find_thread(&["unknown@x", &answer]).unwrap().as_deref(),
            Some("c1")
        );
        assert_eq!(s.recent_answers("c1", 100).unwrap(), 2);
        assert_eq!(s.recent_answers("c1", 100 + RATE_WINDOW_SECS).unwrap(), 1);
    }

    #[test]
    fn ids_are_deterministic() {
        let a = request_id(Some("m@x"), 1, 2);
        assert_eq!(a, request_id(Some("m@x"), 9, 9));
        assert_ne!(a, request_id(Some("n@x"), 1, 2));
        assert_eq!(request_id(None, 1, 2), request_id(None, 1, 2));
        assert_ne!(request_id(None, 1, 2), request_id(None, 1, 3));
        assert!(a.starts_with("em-") && a.len() == 27);
        assert_eq!(answer_id("em-1", "x.org"), "iom-em-1@x.org");
    }
}
