//! The generic CRM feed and webhook options, as written ([`RawFeed`], [`RawWebhook`]) and
//! validated ([`FeedOptions`], [`WebhookOptions`]). `[streams.X.feed]` is how any stream
//! reads a source of kind crm (this kind, CRM → CDP, CRM → S-360); `[streams.X.webhook]`
//! is where any stream writes a target of kind crm (this kind, the S-360 relay). Built by
//! `streams::options`; every problem names the stream and the key.

use serde::Deserialize;

use crate::config::connection::Connection;
use crate::config::load::Layers;

/// `[streams.X.feed]` exactly as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFeed {
    pub path: Option<String>,
    pub cursor_param: Option<String>,
    pub limit_param: Option<String>,
    pub items: Option<String>,
    pub next_cursor: Option<String>,
    pub has_more: Option<String>,
    pub id: Option<String>,
    pub changed_at: Option<String>,
}

/// `[streams.X.webhook]` exactly as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    pub url: Option<String>,
    pub accepted_statuses: Option<Vec<u16>>,
}

/// How a CRM's change feed is read: `[streams.X.feed]` with its defaults.
#[derive(Debug, Clone)]
pub struct FeedOptions {
    pub path: String,
    pub cursor_param: String,
    pub limit_param: Option<String>,
    pub items: String,
    pub next_cursor: String,
    pub has_more: String,
    pub id: String,
    pub changed_at: String,
}

/// Where the CRM takes payloads: `[streams.X.webhook]` with its defaults.
#[derive(Debug, Clone)]
pub struct WebhookOptions {
    pub url: String,
    pub accepted_statuses: Vec<u16>,
}

/// `[streams.X.feed]` of a stream whose source is of kind crm, with its defaults.
pub(crate) fn feed(raw: Option<&RawFeed>) -> FeedOptions {
    let f = raw;
    FeedOptions {
        path: f
            .and_then(|f| f.path.clone())
            .unwrap_or_else(|| "/api/changes?entity={entity}".into()),
        cursor_param: f
            .and_then(|f| f.cursor_param.clone())
            .unwrap_or_else(|| "cursor".into()),
        limit_param: f
            .and_then(|f| f.limit_param.clone())
            .or_else(|| Some("limit".into())),
        items: f
            .and_then(|f| f.items.clone())
            .unwrap_or_else(|| "items".into()),
        next_cursor: f
            .and_then(|f| f.next_cursor.clone())
            .unwrap_or_else(|| "next".into()),
        has_more: f
            .and_then(|f| f.has_more.clone())
            .unwrap_or_else(|| "has_more".into()),
        id: f.and_then(|f| f.id.clone()).unwrap_or_else(|| "id".into()),
        changed_at: f
            .and_then(|f| f.changed_at.clone())
            .unwrap_or_else(|| "updated_at".into()),
    }
}

/// `[streams.X.webhook]` of a stream whose target is of kind crm (its kind as written: also
/// when that connection is broken), with its defaults: the URL (filled with `{stream}`,
/// `{institution}` and `{entity}`) and the statuses that mean accepted.
#[allow(clippy::too_many_arguments)] // the stream's keys it reads, as `streams::options` holds them
pub(crate) fn webhook(
    l: &mut Layers,
    scope: &str,
    prefix: &str,
    name: &str,
    institution: Option<&str>,
    entity: &Option<String>,
    raw: Option<&RawWebhook>,
    target: Option<&Connection>,
) -> WebhookOptions {
    let key = |k: &str| format!("{prefix}.{k}");
    let url = match raw.and_then(|w| w.url.clone()) {
        Some(u) => u,
        None => {
            l.problem(
                scope,
                &key("webhook.url"),
                "missing key `url` (the CRM's webhook URL or path)",
            );
            String::new()
        }
    };
    if !url.is_empty() {
        let expanded = expand(&url, name, institution, entity);
        if expanded.contains('{') {
            l.problem(
                scope,
                &key("webhook.url"),
                "unknown placeholder (known: {stream}, {institution}, {entity}); {institution} needs `institution`",
            );
        } else if let Some(t) = target
            && t.base_url.join(&expanded).is_err()
        {
            l.problem(
                scope,
                &key("webhook.url"),
                format!("{url:?} is not a URL or path"),
            );
        }
    }
    let accepted_statuses = raw
        .and_then(|w| w.accepted_statuses.clone())
        .unwrap_or_else(|| vec![200]);
    if accepted_statuses.iter().any(|s| !(200..300).contains(s)) || accepted_statuses.is_empty() {
        l.problem(
            scope,
            &key("webhook.accepted_statuses"),
            "accepted statuses must be 2xx codes",
        );
    }
    WebhookOptions {
        url,
        accepted_statuses,
    }
}

/// Fills `{stream}`, `{institution}` and `{entity}` in a URL template.
pub fn expand(
    template: &str,
    stream: &str,
    institution: Option<&str>,
    entity: &Option<String>,
) -> String {
    let mut s = template.replace("{stream}", stream);
    if let Some(i) = institution {
        s = s.replace("{institution}", i);
    }
    if let Some(e) = entity {
        s = s.replace("{entity}", e);
    }
    s
}
