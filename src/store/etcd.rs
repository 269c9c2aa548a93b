//! Following etcd (v3 API, `etcd-client`): load everything under the prefix once, then one
//! watch from that revision. Each put or delete under `tenants/` and `certs/` rewrites or
//! removes one file of the local copy ([`Mirror`]), which the reloader applies alone. A lost
//! connection keeps the copy serving, and is retried with backoff from the last revision
//! seen; only when etcd has compacted past it is everything loaded again.

use std::collections::HashMap;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions};
use tokio::sync::watch;

use super::{Entry, Mirror};
use crate::config::EtcdStore;

/// Why talking to etcd failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("etcd at {endpoints}")]
    Etcd {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("cannot write the local copy")]
    Mirror(#[from] crate::acme::AcmeError),
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

const FIRST_RETRY: Duration = Duration::from_millis(250);
const MAX_RETRY: Duration = Duration::from_secs(10);

fn etcd_error(store: &EtcdStore) -> impl Fn(etcd_client::Error) -> StoreError + '_ {
    move |source| StoreError::Etcd {
        endpoints: store.endpoints.join(", "),
        source,
    }
}

/// A client for `store`, bounded in time so that a dead etcd fails fast.
pub async fn connect(store: &EtcdStore) -> Result<Client, StoreError> {
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(10));
    if let Some((user, password)) = &store.user {
        opts = opts.with_user(user.clone(), password.clone());
    }
    Client::connect(&store.endpoints, Some(opts))
        .await
        .map_err(etcd_error(store))
}

/// Every entry under the prefix, and the revision they are at.
pub async fn snapshot(
    client: &mut Client,
    store: &EtcdStore,
) -> Result<(HashMap<Entry, Vec<u8>>, i64), StoreError> {
    let resp = client
        .get(
            store.prefix.as_bytes(),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .map_err(etcd_error(store))?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let mut entries = HashMap::with_capacity(resp.kvs().len());
    for kv in resp.kvs() {
        let key = String::from_utf8_lossy(kv.key());
        if let Some(e) = Entry::of_key(&store.prefix, &key) {
            entries.insert(e, kv.value().to_vec());
        }
    }
    Ok((entries, revision))
}

/// Makes the local copy equal the store; returns the revision it is at.
pub async fn sync(store: &EtcdStore, mirror: &Mirror) -> Result<i64, StoreError> {
    let mut client = connect(store).await?;
    let (entries, revision) = snapshot(&mut client, store).await?;
    let m = mirror.clone();
    tokio::task::spawn_blocking(move || m.replace_all(&entries))
        .await
        .unwrap_or(Ok(()))?;
    Ok(revision)
}

/// Follows the store from `revision` until `stop`, keeping the local copy equal to it.
pub async fn follow(
    store: EtcdStore,
    mirror: Mirror,
    mut revision: i64,
    mut stop: watch::Receiver<bool>,
) {
    let mut wait = FIRST_RETRY;
    loop {
        let watched = tokio::select! {
            _ = crate::state::stopped(&mut stop) => return,
            r = watch_from(&store, &mirror, &mut revision, &mut wait) => r,
        };
        if let Err(e) = watched {
            tracing::warn!(error = %crate::error::sentence(&e), retry_in = ?wait, revision, "lost the etcd store; serving the local copy");
        }
        tokio::select! {
            _ = crate::state::stopped(&mut stop) => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(MAX_RETRY);
    }
}

/// One watch from `revision` + 1, until it fails. A compaction past `revision` loads the
/// whole store again first.
async fn watch_from(
    store: &EtcdStore,
    mirror: &Mirror,
    revision: &mut i64,
    wait: &mut Duration,
) -> Result<(), StoreError> {
    let mut client = connect(store).await?;
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(*revision + 1);
    let mut stream = client
        .watch(store.prefix.as_bytes(), Some(opts))
        .await
        .map_err(etcd_error(store))?;
    tracing::info!(revision, "following the etcd store");
    while let Some(resp) = stream.message().await.map_err(etcd_error(store))? {
        *wait = FIRST_RETRY;
        if resp.compact_revision() > 0 || resp.canceled() {
            tracing::warn!(
                revision,
                compacted = resp.compact_revision(),
                "etcd compacted past the revision followed; loading the whole store again"
            );
            *revision = sync(store, mirror).await?;
            return Ok(());
        }
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            *revision = (*revision).max(kv.mod_revision());
            let key = String::from_utf8_lossy(kv.key());
            let Some(entry) = Entry::of_key(&store.prefix, &key) else {
                continue;
            };
            match ev.event_type() {
                EventType::Put => mirror.put(&entry, kv.value())?,
                EventType::Delete => mirror.remove(&entry),
            }
        }
        if let Some(h) = resp.header() {
            *revision = (*revision).max(h.revision());
        }
    }
    Ok(())
}

/// `store import`: puts every entry of the local files into the store, in batches of one
/// transaction each; returns how many.
pub async fn import(store: &EtcdStore, mirror: &Mirror) -> Result<usize, StoreError> {
    let entries = mirror.entries().map_err(|source| StoreError::Read {
        path: format!(
            "{} and {}",
            mirror.tenants.display(),
            mirror.certs.display()
        ),
        source,
    })?;
    let mut client = connect(store).await?;
    let mut sorted: Vec<_> = entries.into_iter().collect();
    sorted.sort();
    // etcd's default limit is 128 operations per transaction.
    for batch in sorted.chunks(100) {
        let ops: Vec<etcd_client::TxnOp> = batch
            .iter()
            .map(|(e, v)| {
                etcd_client::TxnOp::put(e.key(&store.prefix), v.clone(), None::<PutOptions>)
            })
            .collect();
        client
            .txn(etcd_client::Txn::new().and_then(ops))
            .await
            .map_err(etcd_error(store))?;
    }
    Ok(sorted.len())
}
