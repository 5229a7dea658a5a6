//! The checks on `seatgeek` and `halo` connections (their OAuth2 account keys), called
//! from `build.rs`. The SeatGeek → Halo stream's own options are
//! `streams/seatgeek_halo/options.rs`.

use super::load::Layers;

/// Checks a `seatgeek` or `halo` connection's account keys and builds its OAuth2 auth.
/// SeatGeek's token URL is `{base}/oauth/token`; Halo's comes from `GET /api/authinfo` at
/// run time (the connector replaces the placeholder `token_url`, which is the base URL).
#[allow(clippy::too_many_arguments)] // the connection's pieces, as build.rs holds them
pub(super) fn vendor_auth(
    l: &mut Layers,
    scope: &str,
    prefix: &str,
    kind: super::ConnectionKind,
    raw: &super::raw::RawConnection,
    base_url: Option<&url::Url>,
    config_dir: &std::path::Path,
    warnings: &mut Vec<super::Problem>,
) -> Option<super::Auth> {
    let name = kind.as_str();
    if raw.auth.is_some() {
        l.problem(
            scope,
            &format!("{prefix}.auth"),
            format!("`auth` does not apply to a connection of kind {name} (set `client_id` and `client_secret_file`)"),
        );
    }
    let is_halo = kind == super::ConnectionKind::Halo;
    match (&raw.tenant, is_halo) {
        (None, true) => l.problem(
            scope,
            &format!("{prefix}.tenant"),
            "missing key `tenant` (the Halo tenant name)",
        ),
        (Some(_), false) => l.problem(
            scope,
            &format!("{prefix}.tenant"),
            format!("`tenant` does not apply to a connection of kind {name}"),
        ),
        _ => {}
    }
    let client_id = match &raw.client_id {
        Some(c) if !c.trim().is_empty() => Some(c.clone()),
        _ => {
            l.problem(
                scope,
                &format!("{prefix}.client_id"),
                "missing key `client_id`",
            );
            None
        }
    };
    let secret = super::values::secret(
        l,
        scope,
        prefix,
        "client_secret",
        raw.client_secret.as_ref(),
        raw.client_secret_file.as_ref(),
        raw.client_secret_env.as_ref(),
        config_dir,
        warnings,
    );
    let base = base_url?;
    let token_url = if is_halo {
        base.clone()
    } else {
        let mut b = base.clone();
        if !b.path().ends_with('/') {
            let p = format!("{}/", b.path());
            b.set_path(&p);
        }
        b.join("oauth/token").ok()?
    };
    Some(super::Auth::OAuth2 {
        token_url,
        client_id: client_id?,
        client_secret: secret?,
        scope: is_halo.then(|| "all".to_string()),
    })
}
