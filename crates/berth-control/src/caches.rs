//! What each replica keeps in memory from the store (tokens, org limits, the app → org
//! map) is kept in step across replicas on PostgreSQL: a replica that changes one sends a
//! notice on [`CHANNEL`] (`pg_notify`, delivered once the change is committed), and every
//! replica's listener reads the named row again. A replica whose listener lost its
//! connection may have missed notices, so it reads everything again when it reconnects.
//! A lone SQLite control plane has no one to tell.

use std::sync::{Arc, Weak};
use std::time::Duration;

use sqlx::postgres::PgListener;

use crate::store::{Backend, Database};
use crate::ControlPlane;

/// The notice channel of cache changes.
pub(crate) const CHANNEL: &str = "berth_cache";
/// How long the listener waits before connecting again after a failure.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);
/// How often the listener looks up from the channel to see whether its control plane is
/// gone.
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// A change to a row that replicas keep in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change<'a> {
    Token(&'a str),
    Limits(&'a str),
    App(&'a str),
}

impl Change<'_> {
    fn payload(&self) -> String {
        match self {
            Change::Token(id) => format!("token:{id}"),
            Change::Limits(org) => format!("limits:{org}"),
            Change::App(name) => format!("app:{name}"),
        }
    }
}

fn parse(payload: &str) -> Option<Change<'_>> {
    let (kind, name) = payload.split_once(':')?;
    match kind {
        "token" => Some(Change::Token(name)),
        "limits" => Some(Change::Limits(name)),
        "app" => Some(Change::App(name)),
        _ => None,
    }
}

impl ControlPlane {
    /// Tells the other replicas that `change` was committed. A notice that cannot be sent
    /// is logged: the change itself stands, and the others read the row when they
    /// reconnect or miss it.
    pub(crate) async fn announce(&self, change: Change<'_>) {
        if self.store.backend() != Backend::Postgres {
            return;
        }
        if let Err(error) = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(change.payload())
            .execute(self.store.pool())
            .await
        {
            tracing::warn!(%error, ?change, "telling the other replicas of a change");
        }
    }

    /// Reads the row `change` names again.
    async fn reread(&self, change: Change<'_>) -> Result<(), sqlx::Error> {
        let pool = self.store.pool();
        match change {
            Change::Token(id) => {
                self.tokens.refresh(pool, id).await?;
            }
            Change::Limits(org) => {
                let overrides = crate::tenancy::load_overrides(pool).await?;
                if let Ok(mut map) = self.overrides.write() {
                    match overrides.get(org) {
                        Some(found) => map.insert(org.to_owned(), *found),
                        None => map.remove(org),
                    };
                }
            }
            Change::App(name) => match self.store.app(name).await? {
                Some(row) => self.remember_app(&row.name, &row.org_slug),
                None => self.forget_app(name),
            },
        }
        Ok(())
    }

    /// Reads every cached row again.
    pub(crate) async fn reread_all(&self) -> Result<(), sqlx::Error> {
        let pool = self.store.pool();
        self.tokens.reload(pool).await?;
        let overrides = crate::tenancy::load_overrides(pool).await?;
        if let Ok(mut map) = self.overrides.write() {
            *map = overrides;
        }
        let apps = self.store.apps().await?;
        if let Ok(mut map) = self.app_orgs.write() {
            *map = apps
                .into_iter()
                .map(|app| (app.name, app.org_slug))
                .collect();
        }
        Ok(())
    }
}

/// Follows the other replicas' notices for as long as the control plane lives.
pub(crate) fn spawn_listener(control: &Arc<ControlPlane>, database: &Database) {
    let Database::Postgres(url) = database else {
        return;
    };
    let url = url.clone();
    let weak = Arc::downgrade(control);
    tokio::spawn(async move {
        // The first connection needs no catching up: the caches were just loaded.
        let mut caught_up = true;
        loop {
            if let Err(error) = listen(&weak, &url, &mut caught_up).await {
                tracing::warn!(%error, "following the other replicas' cache notices");
            }
            if weak.strong_count() == 0 {
                return;
            }
            caught_up = false;
            tokio::time::sleep(RECONNECT_AFTER).await;
        }
    });
}

/// One connection's worth of notices; returns when the control plane is gone, or with
/// the error that broke the connection.
async fn listen(
    weak: &Weak<ControlPlane>,
    url: &str,
    caught_up: &mut bool,
) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect(url).await?;
    listener.listen(CHANNEL).await?;
    loop {
        if !*caught_up {
            // Listening again: what changed while no one listened is read afresh.
            let Some(control) = weak.upgrade() else {
                return Ok(());
            };
            control.reread_all().await?;
            *caught_up = true;
        }
        let received = match tokio::time::timeout(CHECK_EVERY, listener.try_recv()).await {
            Ok(received) => received?,
            Err(_) => {
                if weak.strong_count() == 0 {
                    return Ok(());
                }
                continue;
            }
        };
        let Some(control) = weak.upgrade() else {
            return Ok(());
        };
        match received {
            Some(notice) => {
                if let Some(change) = parse(notice.payload()) {
                    if let Err(error) = control.reread(change.clone()).await {
                        // Read again at the next reconnect, or the next miss.
                        tracing::warn!(%error, ?change, "reading a changed row");
                        *caught_up = false;
                    }
                }
            }
            // The connection dropped, and notices sent meanwhile are lost. A listener of
            // its own is made again, listening before the caches are read again, so no
            // change falls between the two.
            None => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_read_back_as_the_change_they_name() {
        for change in [
            Change::Token("abc"),
            Change::Limits("acme"),
            Change::App("web:1"),
        ] {
            assert_eq!(parse(&change.payload()), Some(change.clone()));
        }
        assert_eq!(parse("nonsense"), None);
        assert_eq!(parse("other:x"), None);
    }
}
