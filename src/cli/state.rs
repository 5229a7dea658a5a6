//! `state backup` and `state check`: the state database while the daemon runs.

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
