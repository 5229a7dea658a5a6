//! Rate budgets kept between processes (migration 8): per budget key (a connection, or
//! `s360:<institution>`), the instants of the calls that count in the vendor's window and
//! a running `Retry-After` deadline. Written by `http`'s budgets through
//! `engine::budget_log`; read once when a process builds its HTTP client.

use chrono::{DateTime, Utc};

use super::{Result, Store, now_text, parse_ts, ts};

#[derive(Debug, Clone, PartialEq)]
pub struct BudgetRow {
    pub key: String,
    pub calls: Vec<DateTime<Utc>>,
    pub not_before: Option<DateTime<Utc>>,
}

impl Store {
    /// Every saved budget.
    pub async fn rate_budgets(&self) -> Result<Vec<BudgetRow>> {
        self.read(|db| {
            db.query(
                "SELECT key, calls, not_before FROM rate_budgets",
                p![],
                |r| {
                    let calls = r.text(1)?;
                    let not_before = r.opt_text(2)?;
                    Ok(BudgetRow {
                        key: r.text(0)?,
                        calls: serde_json::from_str::<Vec<String>>(&calls)
                            .unwrap_or_default()
                            .iter()
                            .filter_map(|t| parse_ts(t))
                            .collect(),
                        not_before: not_before.as_deref().and_then(parse_ts),
                    })
                },
            )
        })
        .await
    }

    /// Replaces what is saved for one budget.
    pub async fn save_rate_budget(&self, row: BudgetRow) -> Result<()> {
        self.write(move |db| {
            let calls: Vec<String> = row.calls.iter().map(|t| ts(*t)).collect();
            let calls = serde_json::to_string(&calls).expect("strings serialize");
            db.execute(
                "INSERT INTO rate_budgets (key, calls, not_before, updated_at)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (key) DO UPDATE SET calls = excluded.calls,
                   not_before = excluded.not_before, updated_at = excluded.updated_at",
                p![
                    &row.key,
                    &calls,
                    row.not_before.map(ts).as_deref(),
                    &now_text()
                ],
            )
            .map(|_| ())
        })
        .await
    }
}
