//! `state backup` and `state check`: the state database while the daemon runs.
//! `state migrate`: a SQLite state into PostgreSQL (several instances).

use std::path::Path;
use std::time::Instant;

use super::ops::{load, store_error};
use super::{EX_FAIL, EX_OK};
use crate::config;
use crate::store::Store;

pub fn backup(source: config::Source, file: &Path) -> i32 {
    let config = match load(&source) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let state_dir = &config.daemon.state_dir;
    if file.exists() {
        eprintln!(
            "usher: {} exists already; remove it or name another file",
            file.display()
        );
        return EX_FAIL;
    }
    let started = Instant::now();
    match Store::backup(state_dir, file) {
        Ok(info) => {
            println!(
                "backup of {} written to {} ({} bytes, schema {}, checked) in {:.1}s",
                state_dir.join(crate::store::DB_FILE).display(),
                file.display(),
                info.bytes,
                info.schema,
                started.elapsed().as_secs_f64()
            );
            println!(
                "to restore it: stop usher, copy it over usher.db, delete usher.db-wal and usher.db-shm beside it, start usher"
            );
            EX_OK
        }
        Err(e) => store_error(&e),
    }
}

pub fn check(source: config::Source, full: bool) -> i32 {
    let config = match load(&source) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let path = config.daemon.state_dir.join(crate::store::DB_FILE);
    if !path.exists() {
        println!("{}: no state database yet", path.display());
        return EX_OK;
    }
    let started = Instant::now();
    match Store::check(&config.daemon.state_dir, full) {
        Ok(()) => {
            println!(
                "{}: ok ({}, {:.2}s)",
                path.display(),
                if full {
                    "integrity_check"
                } else {
                    "quick_check"
                },
                started.elapsed().as_secs_f64()
            );
            EX_OK
        }
        Err(e) => store_error(&e),
    }
}

/// `usher state migrate --to postgres://…`: see [`Store::copy_into`].
pub fn migrate(source: config::Source, to: &str, password_file: Option<&Path>) -> i32 {
    let config = match load(&source) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if config.daemon.postgres.is_some() {
        eprintln!(
            "usher: the configuration's state is PostgreSQL already (`[daemon] state`); migrate copies the SQLite state of `state_dir` and is run with a configuration that has no `state` key"
        );
        return EX_FAIL;
    }
    match url::Url::parse(to) {
        Ok(u) if matches!(u.scheme(), "postgres" | "postgresql") => {
            if u.password().is_some() {
                eprintln!(
                    "usher: --to holds a password: put it in a file and pass --password-file FILE (it would be seen in the process list and the shell's history)"
                );
                return EX_FAIL;
            }
        }
        _ => {
            eprintln!(
                "usher: --to must be a postgres://user@host:port/db URL, not {}",
                crate::store::pg::redact_url(to)
            );
            return EX_FAIL;
        }
    }
    let password = match password_file {
        Some(f) => match std::fs::read_to_string(f) {
            Ok(p) => Some(crate::secret::Secret::new(p.trim_end_matches(['\r', '\n']))),
            Err(e) => {
                eprintln!("usher: cannot read the password file {}: {e}", f.display());
                return EX_FAIL;
            }
        },
        None => std::env::var("PGPASSWORD")
            .ok()
            .map(crate::secret::Secret::new),
    };
    let state_dir = config.daemon.state_dir.clone();
    if !state_dir.join(crate::store::DB_FILE).exists() {
        eprintln!(
            "usher: {} holds no state database: nothing to migrate",
            state_dir.display()
        );
        return EX_FAIL;
    }
    // No daemon may write the SQLite state while it is copied.
    let _lock = match crate::engine::lock::acquire(&state_dir) {
        Ok(l) => l,
        Err(crate::engine::lock::LockError::Held { pid, .. }) => {
            eprintln!(
                "usher: a daemon{} runs on {}: stop it first (systemctl stop usher), then migrate",
                pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
                state_dir.display()
            );
            return EX_FAIL;
        }
        Err(e) => {
            eprintln!("usher: {e}");
            return EX_FAIL;
        }
    };
    let sqlite = match Store::open_existing(&state_dir) {
        Ok(Some(s)) => s,
        Ok(None) => {
            eprintln!("usher: {} holds no state database", state_dir.display());
            return EX_FAIL;
        }
        Err(e) => return store_error(&e),
    };
    let settings = crate::store::pg::PgSettings {
        url: to.to_string(),
        password,
    };
    let started = Instant::now();
    let copied = super::block_on(async {
        let target = Store::open_postgres(&settings).await?;
        sqlite.copy_into(&target).await
    });
    match copied {
        Ok(tables) => {
            let total: u64 = tables.iter().map(|(_, n)| n).sum();
            for (table, n) in &tables {
                println!("  {table:<22} {n:>10} rows");
            }
            println!(
                "copied {total} rows from {} into {} in {:.1}s",
                state_dir.join(crate::store::DB_FILE).display(),
                crate::store::pg::redact_url(to),
                started.elapsed().as_secs_f64()
            );
            println!(
                "next: set `state = \"{}\"` (and `state_password_file`) under [daemon] on every host and start the instances; keep {} as a backup, unused from now on",
                crate::store::pg::redact_url(to),
                state_dir.join(crate::store::DB_FILE).display()
            );
            EX_OK
        }
        Err(e) => store_error(&e),
    }
}
