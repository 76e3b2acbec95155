//! The tool-use loop: ask, run the requested tools, send their results back, repeat.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde_json::Value;

use super::client::StreamEvent;
use super::error::ClaudeError;
use super::types::{ContentBlock, Message, MessagesRequest, Role, StopReason, Usage};
use crate::agent::model::ModelClient;

/// The output of one tool call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolResult {
    /// Output text sent back to the model.
    pub content: String,
    /// Whether the call failed (the model sees `is_error: true`).
    pub is_error: bool,
}

impl ToolResult {
    /// A successful result.
    pub fn ok(content: impl Into<String>) -> Self {
        Self {
            content: content.into(),
            is_error: false,
        }
    }

    /// A failed result.
    pub fn error(content: impl Into<String>) -> Self {
        Self {
            content: content.into(),
            is_error: true,
        }
    }
}

/// Runs the tools the model asks for (in the agent, inside a sandbox container).
///
/// Failures are reported as a [`ToolResult`] with `is_error`, never as a Rust error: the
/// model decides what to do about them. The trait is object safe (`&dyn ToolExecutor`).
pub trait ToolExecutor: Send + Sync {
    /// Runs tool `name` with `input` and returns its output.
    fn run<'a>(
        &'a self,
        name: &'a str,
        input: &'a Value,
    ) -> Pin<Box<dyn Future<Output = ToolResult> + Send + 'a>>;
}

/// A budget shared with other runs (the agent's budgets). Room for each model call is
/// reserved before it and its use charged as soon as it ends, so runs going on at the same
/// time see each other's use and cannot together pass the budget.
pub trait TokenBudget: Send + Sync {
    /// Before a model call of about `input` input tokens and at most `max_output` output
    /// tokens: `false` if the budget cannot hold it. The run then stops before the call
    /// ([`StoppedBy::TokenBudget`]).
    fn reserve(&self, input: u64, max_output: u64) -> bool {
        let _ = (input, max_output);
        true
    }

    /// Records the use of a finished call (and releases its reservation). Returns `false`
    /// once the budget is used up: the run then stops as with [`Limits::token_budget`]
    /// ([`StoppedBy::TokenBudget`]).
    fn charge(&self, usage: &Usage) -> bool;
}

/// No shared budget: nothing is charged and nothing stops a run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unlimited;

impl TokenBudget for Unlimited {
    fn charge(&self, _usage: &Usage) -> bool {
        true
    }
}

/// Limits of one conversation run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most model calls in this run (at least 1).
    pub max_turns: u32,
    /// `max_tokens` of each reply; `None` uses the client's configured value.
    pub max_tokens: Option<u32>,
    /// Stop after a turn once input plus output tokens of this run reach this total.
    pub token_budget: Option<u64>,
}

impl Default for Limits {
    /// 20 turns, the client's `max_tokens`, no token budget.
    fn default() -> Self {
        Self {
            max_turns: 20,
            max_tokens: None,
            token_budget: None,
        }
    }
}

/// Progress of a conversation run, for live display.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Progress {
    /// A piece of model text.
    TextDelta(String),
    /// A tool call is about to run.
    ToolCallStarted {
        /// Tool-use id.
        id: String,
        /// Tool name.
        name: String,
        /// Tool input.
        input: Value,
    },
    /// A tool call finished.
    ToolCallFinished {
        /// Tool-use id.
        id: String,
        /// Tool name.
        name: String,
        /// Output sent back to the model.
        output: String,
        /// Whether it failed.
        is_error: bool,
    },
    /// A model call failed and is retried after `wait`.
    Retrying {
        /// Retry number (1-based).
        attempt: u32,
        /// Wait before the retry.
        wait: Duration,
        /// Why.
        reason: String,
    },
    /// A model call finished.
    TurnFinished {
        /// Turn number (1-based).
        turn: u32,
        /// Tokens of this turn.
        usage: Usage,
    },
}

/// One executed tool call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCallRecord {
    /// Tool-use id.
    pub id: String,
    /// Tool name.
    pub name: String,
    /// Tool input.
    pub input: Value,
    /// Output sent back to the model.
    pub output: String,
    /// Whether it failed.
    pub is_error: bool,
}

/// Why a run stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoppedBy {
    /// The model finished (or stopped for a reason that needs no more turns).
    EndTurn,
    /// `max_turns` model calls were made and the model still wanted tools.
    MaxTurns,
    /// The last reply hit `max_tokens`.
    MaxTokens,
    /// The run's token budget was used up.
    TokenBudget,
}

impl std::fmt::Display for StoppedBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::EndTurn => "the model finished",
            Self::MaxTurns => "stopped: the turn limit was reached",
            Self::MaxTokens => "stopped: the reply reached max_tokens",
            Self::TokenBudget => "stopped: the token budget was used up",
        })
    }
}

/// The result of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The text of the last model reply.
    pub final_text: String,
    /// Every tool call that ran, in order.
    pub tool_calls: Vec<ToolCallRecord>,
    /// Tokens of all turns.
    pub usage: Usage,
    /// Model calls made.
    pub turns: u32,
    /// Why the run stopped.
    pub stopped_by: StoppedBy,
    /// The messages this run appended to the history (assistant replies and tool results),
    /// ready to be stored. Tool calls left unrun by a limit get an error result here, so the
    /// stored history stays valid for the API.
    pub new_messages: Vec<Message>,
}

/// Runs a conversation: calls the model, runs each requested tool through `executor` (in
/// order), sends the results back, and repeats until the model ends its turn or a limit
/// stops it. Limits end the run with [`StoppedBy`], not an error. No shared budget: see
/// [`run_with_budget`].
pub async fn run_conversation<M, E>(
    client: &M,
    system: Option<String>,
    history: Vec<Message>,
    tools: Value,
    executor: &E,
    limits: Limits,
    on: &mut (dyn FnMut(Progress) + Send),
) -> Result<Outcome, ClaudeError>
where
    M: ModelClient + ?Sized,
    E: ToolExecutor + ?Sized,
{
    run_with_budget(
        client, system, history, tools, executor, limits, &Unlimited, on,
    )
    .await
}

/// [`run_conversation`] with a [`TokenBudget`] shared with other runs: each turn's tokens
/// are charged to `budget` as soon as the turn ends, and the run stops
/// ([`StoppedBy::TokenBudget`]) once it says the budget is used up.
#[allow(clippy::too_many_arguments)]
pub async fn run_with_budget<M, E>(
    client: &M,
    system: Option<String>,
    history: Vec<Message>,
    tools: Value,
    executor: &E,
    limits: Limits,
    budget: &dyn TokenBudget,
    on: &mut (dyn FnMut(Progress) + Send),
) -> Result<Outcome, ClaudeError>
where
    M: ModelClient + ?Sized,
    E: ToolExecutor + ?Sized,
{
    let history_len = history.len();
    let mut req = MessagesRequest {
        system,
        messages: history,
        tools: Some(tools),
        model: None,
        max_tokens: limits.max_tokens,
    };
    let mut usage = Usage::default();
    let mut tool_calls = Vec::new();
    let mut final_text = String::new();
    let max_turns = limits.max_turns.max(1);
    let max_output = u64::from(limits.max_tokens.unwrap_or(0));
    let mut turns = 0u32;
    let stopped_by = loop {
        if !budget.reserve(req.estimated_input_tokens(), max_output) {
            break StoppedBy::TokenBudget;
        }
        let turn = {
            let mut forward = |ev: StreamEvent| match ev {
                StreamEvent::TextDelta(t) => on(Progress::TextDelta(t)),
                StreamEvent::Retrying {
                    attempt,
                    wait,
                    reason,
                } => on(Progress::Retrying {
                    attempt,
                    wait,
                    reason,
                }),
                _ => {}
            };
            client.stream(&req, &mut forward).await?
        };
        turns += 1;
        usage += turn.usage;
        let budget_left = budget.charge(&turn.usage);
        on(Progress::TurnFinished {
            turn: turns,
            usage: turn.usage,
        });
        final_text = turn.text();
        let uses: Vec<(String, String, Value)> = turn
            .content
            .iter()
            .filter_map(|b| match b {
                ContentBlock::ToolUse { id, name, input } => {
                    Some((id.clone(), name.clone(), input.clone()))
                }
                _ => None,
            })
            .collect();
        if !turn.content.is_empty() {
            req.messages
                .push(Message::blocks(Role::Assistant, turn.content));
        }
        let over_budget = !budget_left
            || limits
                .token_budget
                .is_some_and(|budget| usage.total() >= budget);
        let wants_tools = turn.stop_reason == StopReason::ToolUse && !uses.is_empty();
        if !wants_tools {
            break match turn.stop_reason {
                StopReason::MaxTokens => StoppedBy::MaxTokens,
                _ => StoppedBy::EndTurn,
            };
        }
        let limit = if turns >= max_turns {
            Some(StoppedBy::MaxTurns)
        } else if over_budget {
            Some(StoppedBy::TokenBudget)
        } else {
            None
        };
        let mut results = Vec::with_capacity(uses.len());
        for (id, name, input) in uses {
            let result = match limit {
                Some(why) => ToolResult::error(format!("not run: {why}")),
                None => {
                    on(Progress::ToolCallStarted {
                        id: id.clone(),
                        name: name.clone(),
                        input: input.clone(),
                    });
                    let result = executor.run(&name, &input).await;
                    on(Progress::ToolCallFinished {
                        id: id.clone(),
                        name: name.clone(),
                        output: result.content.clone(),
                        is_error: result.is_error,
                    });
                    tool_calls.push(ToolCallRecord {
                        id: id.clone(),
                        name,
                        input,
                        output: result.content.clone(),
                        is_error: result.is_error,
                    });
                    result
                }
            };
            results.push(ContentBlock::ToolResult {
                tool_use_id: id,
                content: result.content,
                is_error: result.is_error,
            });
        }
        req.messages.push(Message::blocks(Role::User, results));
        if let Some(why) = limit {
            break why;
        }
    };
    let new_messages = req.messages.split_off(history_len.min(req.messages.len()));
    Ok(Outcome {
        final_text,
        tool_calls,
        usage,
        turns,
        stopped_by,
        new_messages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::claude::{ApiKey, ClaudeClient, ClaudeConfig};

    struct NoTools;

    impl ToolExecutor for NoTools {
        fn run<'a>(
            &'a self,
            name: &'a str,
            _input: &'a Value,
        ) -> Pin<Box<dyn Future<Output = ToolResult> + Send + 'a>> {
            Box::pin(async move { ToolResult::error(format!("no tool {name}")) })
        }
    }

    fn assert_send<T: Send>(_: &T) {}

    /// The agent spawns these futures on tokio, so they must be `Send`.
    #[test]
    fn conversation_and_stream_futures_are_send() -> Result<(), Box<dyn std::error::Error>> {
        let client = ClaudeClient::new(ClaudeConfig::new(ApiKey::new("sk-test")?))?;
        let mut on = |_: Progress| {};
        let fut = run_conversation(
            &client,
            None,
            vec![Message::user("hi")],
            Value::Null,
            &NoTools,
            Limits::default(),
            &mut on,
        );
        assert_send(&fut);
        let req = MessagesRequest::default();
        let mut on_stream = |_: StreamEvent| {};
        let fut = client.stream(&req, &mut on_stream);
        assert_send(&fut);
        // ToolExecutor stays object safe.
        let _object_safe: &dyn ToolExecutor = &NoTools;
        Ok(())
    }
}
