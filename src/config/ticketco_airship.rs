//! Ticket Co x Airship: the connection fields of kinds `ticketco` and `airship`, checked
//! with every problem reported (called from `build.rs`). The stream's own options are
//! `streams/ticketco_airship/options.rs`.

use std::path::Path;

use super::load::{Layers, Problem};
use super::raw::RawConnection;
use super::values::secret;
use super::{Auth, ConnectionKind};
use crate::secret::Secret;

/// What a `ticketco` or `airship` connection adds: (Ticket Co API token, Airship account ID,
/// Airship auth). Keys of the other kind are refused.
#[allow(clippy::too_many_arguments)] // mirrors `build::secret`'s inputs
pub(super) fn connection_fields(
    l: &mut Layers,
    scope: &str,
    prefix: &str,
    kind: Option<ConnectionKind>,
    raw: &RawConnection,
    config_dir: &Path,
    warnings: &mut Vec<Problem>,
) -> (Option<Secret>, Option<i64>, Option<Auth>) {
    let ticketco_keys = [
        ("api_token", raw.api_token.is_some()),
        ("api_token_file", raw.api_token_file.is_some()),
        ("api_token_env", raw.api_token_env.is_some()),
    ];
    let airship_keys = [
        ("access_token", raw.access_token.is_some()),
        ("access_token_file", raw.access_token_file.is_some()),
        ("access_token_env", raw.access_token_env.is_some()),
        ("account_id", raw.account_id.is_some()),
    ];
    let refuse = |l: &mut Layers, keys: &[(&str, bool)], k: &str| {
        for (key, set) in keys {
            if *set {
                l.problem(
                    scope,
                    &format!("{prefix}.{key}"),
                    format!("`{key}` does not apply to a connection of kind {k}"),
                );
            }
        }
    };
    let generic = [
        ("auth", raw.auth.is_some()),
        ("tenant", raw.tenant.is_some()),
        ("client_id", raw.client_id.is_some()),
        ("client_secret", raw.client_secret.is_some()),
        ("client_secret_file", raw.client_secret_file.is_some()),
        ("client_secret_env", raw.client_secret_env.is_some()),
    ];
    match kind {
        Some(ConnectionKind::TicketCo) => {
            refuse(l, &airship_keys, "ticketco");
            refuse(l, &generic, "ticketco (the API token is `api_token_file`)");
            let token = secret(
                l,
                scope,
                prefix,
                "api_token",
                raw.api_token.as_ref(),
                raw.api_token_file.as_ref(),
                raw.api_token_env.as_ref(),
                config_dir,
                warnings,
            );
            (token, None, None)
        }
        Some(ConnectionKind::Airship) => {
            refuse(l, &ticketco_keys, "airship");
            refuse(l, &generic, "airship (the token is `access_token_file`)");
            let token = secret(
                l,
                scope,
                prefix,
                "access_token",
                raw.access_token.as_ref(),
                raw.access_token_file.as_ref(),
                raw.access_token_env.as_ref(),
                config_dir,
                warnings,
            );
            let account = match raw.account_id {
                None => {
                    l.problem(
                        scope,
                        &format!("{prefix}.account_id"),
                        "missing key `account_id` (the Airship account number)",
                    );
                    None
                }
                Some(n) if n <= 0 => {
                    l.problem(
                        scope,
                        &format!("{prefix}.account_id"),
                        "`account_id` must be a positive number",
                    );
                    None
                }
                Some(n) => Some(n),
            };
            (None, account, token.map(|token| Auth::Bearer { token }))
        }
        _ => {
            let k = kind.map(|k| k.as_str()).unwrap_or("?");
            refuse(l, &ticketco_keys, k);
            refuse(l, &airship_keys, k);
            (None, None, None)
        }
    }
}
