//! Rate budgets kept in the state: the bridge between `http`'s budgets and `store`, and the
//! one way a process builds its HTTP client ([`http_client`]), so that every process (the
//! daemon, `usher trigger`, `import`, `backfill`) starts from the calls already made in a
//! vendor's window and from a running `Retry-After` (issue 19, item 7).

use std::sync::Arc;
use std::time::SystemTime;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;

use crate::http::{BudgetLog, Http, SavedBudget};
use crate::store::{BudgetRow, Store, StoreError};

struct StateBudgets(Store);

impl BudgetLog for StateBudgets {
    fn save<'a>(&'a self, b: SavedBudget) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            self.0
                .save_rate_budget(BudgetRow {
                    key: b.key,
                    calls: b.calls.into_iter().map(DateTime::<Utc>::from).collect(),
                    not_before: b.not_before.map(DateTime::<Utc>::from),
                })
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// The process's HTTP client, its budgets restored from and saved to `store`.
pub async fn http_client(store: &Store) -> Result<Http, StoreError> {
    let saved = saved_budgets(store).await?;
    Ok(Http::new().with_budget_log(Arc::new(StateBudgets(store.clone())), saved))
}

/// Every budget as the state holds it now.
pub async fn saved_budgets(store: &Store) -> Result<Vec<SavedBudget>, StoreError> {
    Ok(store
        .rate_budgets()
        .await?
        .into_iter()
        .map(|r| SavedBudget {
            key: r.key,
            calls: r.calls.into_iter().map(SystemTime::from).collect(),
            not_before: r.not_before.map(SystemTime::from),
        })
        .collect())
}
