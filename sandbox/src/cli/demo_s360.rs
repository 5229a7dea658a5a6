//! The S-360 part of `usher-sandbox demo`: start the receiver on a free port and let the S-360
//! sender fake post contacts and orders into it (as S-360 would), add offer requests to the
//! CRM fake, and give the S-360 fake a few contacts that the CRM's contacts will match.

use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use usher::config::{Auth, Config};
use usher::store::Store;
use usher::streams::options::StreamKind;
use usher_sandbox::s360::{webhook_contact, webhook_order};
use usher_sandbox::{S360Sender, Sandbox};

/// `receiver.listen` on a free port, for the demo's config layer.
pub fn listen_override() -> serde_json::Value {
    json!({ "listen": "127.0.0.1:0" })
}

/// Seeds the fakes and the receiver; returns a line per thing done.
pub async fn seed(config: &Config, store: &Store, sandbox: &Sandbox) -> Vec<String> {
    let mut said = Vec::new();
    sandbox
        .s360
        .set_rate_limit(3000, Duration::from_secs(60), 509);
    sandbox.crm.add_offers(12);
    sandbox.s360.add_contact(
        json!({"individualContact": {"email": "person1@example.org", "firstName": "Known"}}),
    );
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    let receiver = match usher::receiver::start(config, store.clone(), stop.clone(), &tracker).await
    {
        Ok(Some(r)) => r,
        Ok(None) => return said,
        Err(e) => {
            said.push(format!("S-360 receiver not started: {e}"));
            return said;
        }
    };
    for spec in config.streams.values() {
        let StreamKind::S360Relay { relay, .. } = &spec.kind else {
            continue;
        };
        let mut sender = S360Sender::new(&format!("http://{}{}", receiver.addr, relay.path));
        sender.auth = match &relay.auth {
            Auth::Bearer { token } => {
                Some(("authorization".into(), format!("Bearer {}", token.expose())))
            }
            _ => None,
        };
        let records: Vec<_> = match relay.entity {
            usher::streams::s360::options::S360Entity::Contacts => {
                (1..=260).map(webhook_contact).collect()
            }
            usher::streams::s360::options::S360Entity::Orders => {
                let states = ["CLOSED", "ABANDONED", "IN_PROGRESS"];
                (1..=120)
                    .map(|i| webhook_order(i, states[i as usize % 3]))
                    .collect()
            }
        };
        let rep = sender.send(&records).await;
        said.push(format!(
            "the S-360 sender posted {} {} to {} in {} POSTs (statuses {:?})",
            records.len(),
            relay.entity.as_str(),
            relay.path,
            rep.posts,
            rep.statuses
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
        ));
    }
    stop.cancel();
    tracker.close();
    tracker.wait().await;
    said
}
