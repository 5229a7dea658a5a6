//! Man pages beyond what clap_mangen makes of the CLI: usher(1)'s FILES, SIGNALS and EXIT
//! STATUS sections, and usher.toml(5), rendered from `doc/configuration.md`, the same text
//! as the README's configuration reference (a test keeps the README's copy equal to it),
//! so that the page and the README cannot drift apart.

/// The configuration reference: every key, table by table (Markdown).
pub const CONFIG_REFERENCE: &str = include_str!("../../doc/configuration.md");

const FILES: &[(&str, &str)] = &[
    (
        "/etc/usher/usher.toml",
        "The main configuration (--config for another); see usher.toml(5).",
    ),
    (
        "/etc/usher/usher.d/*.toml",
        "Drop-ins, merged over the main file in name order, key by key.",
    ),
    (
        "/var/lib/usher/usher.db",
        "The state: cursors, links, outbox, runs, dead letters (SQLite; with usher.db-wal and usher.db-shm beside it). The folder is daemon.state_dir, $STATE_DIRECTORY under systemd.",
    ),
    (
        "/var/lib/usher/usher.lock",
        "The daemon's lock and PID: one daemon per state folder.",
    ),
    (
        "/var/lib/usher/control/",
        "Control files (reset.STREAM, trigger.STREAM) that the CLI drops for the daemon.",
    ),
    (
        "/var/lib/usher/reload.json",
        "The daemon's verdict on its last reload, which usher reload waits for.",
    ),
    (
        "/var/log/usher/",
        "Daily log files, when log.directory names it (log.keep_files are kept).",
    ),
    (
        "/usr/lib/systemd/system/usher.service",
        "The systemd unit; local changes in a drop-in (systemctl edit usher).",
    ),
];

const SIGNALS: &[(&str, &str)] = &[
    (
        "SIGHUP",
        "Reload the configuration files. An invalid configuration is refused and logged, and the old one keeps running; runs in flight finish on the old configuration. systemctl reload usher runs usher reload, which waits for this verdict and fails when the configuration is refused.",
    ),
    (
        "SIGTERM, SIGINT",
        "Stop scheduling; each run finishes the page it is on and commits, then usher exits 0.",
    ),
    (
        "a second SIGTERM or SIGINT",
        "Abandon the runs where they are (also when daemon.shutdown_timeout passes); nothing uncommitted is kept; exit 1.",
    ),
    ("SIGUSR1", "Look at the control folder now."),
];

const EXIT_STATUS: &[(&str, &str)] = &[
    ("0", "Done; the daemon stopped cleanly."),
    (
        "1",
        "Failed, or the daemon's runs were abandoned at shutdown.",
    ),
    (
        "65",
        "The state database cannot be used: damaged, written by a newer usher, not usher's, or moved away under the daemon.",
    ),
    (
        "75",
        "The state cannot be used for now: the disk full, an I/O error, the database busy (systemd starts usher again).",
    ),
    ("77", "No permission on the state folder or a file in it."),
    (
        "78",
        "The configuration is invalid (also usher reload when the daemon refused it).",
    ),
];

/// usher(1): clap_mangen's page of the CLI, then FILES, SIGNALS, EXIT STATUS and SEE ALSO.
pub fn usher_1(cmd: clap::Command) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd).render(&mut out)?;
    let mut extra = String::new();
    for (title, items) in [
        ("FILES", FILES),
        ("SIGNALS", SIGNALS),
        ("EXIT STATUS", EXIT_STATUS),
    ] {
        extra.push_str(&format!(".SH \"{title}\"\n"));
        for (term, text) in items {
            extra.push_str(&format!(".TP\n\\fB{}\\fR\n{}\n", roff(term), roff(text)));
        }
    }
    extra.push_str(
        ".SH \"SEE ALSO\"\n\\fBusher.toml\\fR(5), \\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1)\n",
    );
    out.extend_from_slice(extra.as_bytes());
    Ok(out)
}

/// usher.toml(5) from the Markdown reference: `####` headings become subsections, table
/// rows `| key | meaning | default |` tagged paragraphs, other lines paragraphs.
pub fn usher_toml_5(reference: &str, version: &str) -> String {
    let mut out = format!(
        ".TH USHER.TOML 5 \"\" \"usher {version}\" \"File Formats\"\n\
         .SH NAME\nusher.toml \\- configuration of the usher integration daemon\n\
         .SH SYNOPSIS\n/etc/usher/usher.toml, /etc/usher/usher.d/*.toml\n\
         .SH DESCRIPTION\n\
         TOML: one main file and drop-ins merged over it in name order, key by key. \
         Environment variables USHER_SECTION__NAME__KEY override both (double underscores \
         separate the levels). \\fBusher validate\\fR loads them exactly as \\fBusher run\\fR \
         does and prints every problem.\n.PP\n"
    );
    let mut paragraph = String::new();
    let flush = |out: &mut String, p: &mut String| {
        if !p.is_empty() {
            out.push_str(&roff_inline(p.trim()));
            out.push_str("\n.PP\n");
            p.clear();
        }
    };
    for line in reference.lines() {
        let line = line.trim_end();
        if let Some(h) = line.strip_prefix("#### ") {
            flush(&mut out, &mut paragraph);
            out.push_str(&format!(".SH \"{}\"\n", roff(&strip_code(h))));
        } else if line.starts_with('|') {
            flush(&mut out, &mut paragraph);
            let cells = table_cells(line);
            if cells.len() < 3 || cells[0] == "key" || cells[0].starts_with("---") {
                continue;
            }
            let default = if cells[2].is_empty() {
                String::new()
            } else {
                format!(" (default: {})", roff_inline(&cells[2]))
            };
            out.push_str(&format!(
                ".TP\n{}{default}\n{}\n",
                roff_inline(&cells[0]),
                roff_inline(&cells[1])
            ));
        } else if line.is_empty() {
            flush(&mut out, &mut paragraph);
        } else {
            paragraph.push_str(line);
            paragraph.push(' ');
        }
    }
    flush(&mut out, &mut paragraph);
    out.push_str(
        ".SH \"SEE ALSO\"\n\\fBusher\\fR(1); the README (/usr/share/doc/usher/README.md) explains each stream kind with examples.\n",
    );
    out
}

/// The cells of a Markdown table row; `\|` is a `|` inside a cell.
fn table_cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    let mut cells = vec![String::new()];
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                cells.last_mut().expect("one cell").push('|');
                chars.next();
            }
            '|' => cells.push(String::new()),
            c => cells.last_mut().expect("one cell").push(c),
        }
    }
    cells.into_iter().map(|c| c.trim().to_string()).collect()
}

fn strip_code(s: &str) -> String {
    s.replace('`', "")
}

/// Text for roff: backslashes and hyphens escaped, a leading `.` or `'` (a request at the
/// start of a line) made literal.
fn roff(s: &str) -> String {
    let s = s.replace('\\', "\\e").replace('-', "\\-");
    if s.starts_with('.') || s.starts_with('\'') {
        format!("\\&{s}")
    } else {
        s
    }
}

/// [`roff`] for text inside a line: no leading-dot escape.
fn roff_mid(s: &str) -> String {
    s.replace('\\', "\\e").replace('-', "\\-")
}

/// [`roff`], with `code` in bold.
fn roff_inline(s: &str) -> String {
    let mut out = String::new();
    for (i, part) in s.split('`').enumerate() {
        if i % 2 == 1 {
            out.push_str(&format!("\\fB{}\\fR", roff_mid(part)));
        } else {
            out.push_str(&roff_mid(part));
        }
    }
    if out.starts_with('.') || out.starts_with('\'') {
        out.insert_str(0, "\\&");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_rows_become_tagged_paragraphs() {
        let page = usher_toml_5(
            "Intro `x`.\n\n#### `[log]`\n\n| key | meaning | default |\n|---|---|---|\n| `level` | a \\| b | `\"info\"` |\n",
            "1.0",
        );
        assert!(page.contains(".SH \"[log]\""), "{page}");
        assert!(
            page.contains(".TP\n\\fBlevel\\fR (default: \\fB\"info\"\\fR)\na | b\n"),
            "{page}"
        );
        assert!(page.contains("Intro \\fBx\\fR."), "{page}");
    }
}
