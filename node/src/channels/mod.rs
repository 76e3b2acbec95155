//! Channels people already use, beside the CLI, the web page and the webhook.
//!
//! - [`email`]: mail in by IMAP IDLE, answers out by SMTP, one conversation per mail thread.

pub mod email;
