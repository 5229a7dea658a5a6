//! The generic feed source (vendor-apis "ExtCRM"): a cursor-paginated JSON feed configured by
//! URL, cursor parameter and the JSON paths of the items, the next cursor and "has more".
//! It knows URLs and JSON only; retries and budgets are `http`'s.

use reqwest::Method;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{Page, SourceError};
use crate::http::{Endpoint, Retry};
use crate::mapping::lookup;
use crate::streams::feed_webhook::options::FeedOptions;

pub struct FeedSource {
    pub endpoint: Endpoint,
    pub options: FeedOptions,
    /// The path with `{entity}` filled in.
    pub path: String,
}

impl FeedSource {
    pub fn new(endpoint: Endpoint, options: FeedOptions, entity: &str) -> Self {
        let path = options.path.replace("{entity}", entity);
        FeedSource {
            endpoint,
            options,
            path,
        }
    }

    /// One page from `cursor` (None: the start). A 400 that says `invalid_cursor` is
    /// [`SourceError::InvalidCursor`], which tells the operator to reset `stream`.
    pub async fn pull(
        &self,
        stream: &str,
        cursor: Option<&str>,
        limit: u32,
        cancel: &CancellationToken,
    ) -> Result<Page, SourceError> {
        let mut url = self.endpoint.url(&self.path);
        {
            let mut q = url.query_pairs_mut();
            if let Some(c) = cursor {
                q.append_pair(&self.options.cursor_param, c);
            }
            if let Some(l) = &self.options.limit_param {
                q.append_pair(l, &limit.to_string());
            }
        }
        let reply = self
            .endpoint
            .send(Method::GET, url.clone(), Retry::Idempotent, cancel, |rb| rb)
            .await?;
        let what = crate::http::describe(&Method::GET, &url);
        if reply.status == 400 && cursor.is_some() && reply.snippet().contains("invalid_cursor") {
            return Err(SourceError::InvalidCursor {
                conn: self.endpoint.name.clone(),
                stream: stream.to_string(),
            });
        }
        if !reply.is_success() {
            return Err(SourceError::Http(crate::http::HttpError::Status {
                conn: self.endpoint.name.clone(),
                what,
                status: reply.status,
                snippet: reply.snippet(),
                attempts: reply.attempts,
            }));
        }
        let body: Value =
            serde_json::from_slice(&reply.body).map_err(|e| SourceError::Malformed {
                conn: self.endpoint.name.clone(),
                what: what.clone(),
                reason: format!(
                    "not JSON ({e}); the answer starts with: {}",
                    reply.snippet()
                ),
            })?;
        parse_page(&body, &self.options).map_err(|reason| SourceError::Malformed {
            conn: self.endpoint.name.clone(),
            what,
            reason,
        })
    }
}

/// Reads one page of the feed out of its JSON. Pure, so the shapes are easy to test.
pub fn parse_page(body: &Value, o: &FeedOptions) -> Result<Page, String> {
    let items = match lookup(body, &o.items) {
        Some(Value::Array(a)) => a.clone(),
        Some(Value::Null) | None => return Err(format!("no array at `{}`", o.items)),
        Some(other) => return Err(format!("`{}` is {}, not an array", o.items, kind(other))),
    };
    let next_cursor = match lookup(body, &o.next_cursor) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(other) => {
            return Err(format!(
                "`{}` is {}, not a cursor",
                o.next_cursor,
                kind(other)
            ));
        }
    };
    let has_more = match lookup(body, &o.has_more) {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(format!(
                "`{}` is {}, not true/false",
                o.has_more,
                kind(other)
            ));
        }
    };
    Ok(Page {
        records: items,
        next_cursor,
        has_more,
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn opts() -> FeedOptions {
        FeedOptions {
            path: "/api/changes".into(),
            cursor_param: "cursor".into(),
            limit_param: None,
            items: "data.items".into(),
            next_cursor: "data.next".into(),
            has_more: "data.more".into(),
            id: "id".into(),
            changed_at: "updated_at".into(),
        }
    }

    #[test]
    fn reads_configured_paths() {
        let p = parse_page(
            &json!({"data": {"items": [{"id": 1}], "next": "c2", "more": true}}),
            &opts(),
        )
        .unwrap();
        assert_eq!(p.records.len(), 1);
        assert_eq!(p.next_cursor.as_deref(), Some("c2"));
        assert!(p.has_more);
    }

    #[test]
    fn a_wrong_shape_names_the_path() {
        let err = parse_page(&json!({"data": {"items": {"id": 1}}}), &opts()).unwrap_err();
        assert!(err.contains("`data.items` is an object"), "{err}");
        let err = parse_page(&json!({"error": "x"}), &opts()).unwrap_err();
        assert!(err.contains("no array at `data.items`"), "{err}");
    }
}
