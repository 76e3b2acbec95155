//! Claude Messages API client (SSE streaming, retries, tool-use loop).
