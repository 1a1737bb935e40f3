//! The embedded adapters against the port contract suite, plus what only
//! SQLite shows: stale receipts, the dead-letter table's contents, and
//! durability across closing and reopening the file.

use pacloud_domain::ports::{Created, JobQueue, MetadataStore, QueueError};
use pacloud_domain::{Clock, SystemClock};
use pacloud_local::{Db, DirArtifactStore, SigningKey, SqliteQueue, SqliteStore};
use std::sync::Arc;
use std::time::Duration;

fn clock() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_contract() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("t.db")).unwrap();
    pacloud_contract::metadata_store(Arc::new(SqliteStore::new(db))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_contract() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("t.db")).unwrap();
    pacloud_contract::job_queue(Arc::new(SqliteQueue::new(db, clock(), 2))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifact_contract() {
    let dir = tempfile::tempdir().unwrap();
    let store =
        DirArtifactStore::new(dir.path().join("a"), "http://127.0.0.1:1", SigningKey::new(&[7; 32]), clock()).unwrap();
    pacloud_contract::artifact_store(Arc::new(store.clone())).await;
    pacloud_contract::artifact_cas_race(Arc::new(store)).await;
}

#[tokio::test]
async fn stale_receipts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let q = SqliteQueue::new(Db::open(&dir.path().join("t.db")).unwrap(), clock(), 5);
    q.send("a", Duration::ZERO).await.unwrap();
    let first = q.receive(1, Duration::from_millis(50), Duration::ZERO).await.unwrap().pop().unwrap();
    tokio::time::sleep(Duration::from_millis(80)).await;
    let second = q.receive(1, Duration::from_secs(30), Duration::ZERO).await.unwrap().pop().unwrap();
    assert!(matches!(q.extend(&first.receipt, Duration::from_secs(60)).await, Err(QueueError::StaleReceipt)));
    assert!(matches!(q.release(&first.receipt, Duration::ZERO).await, Err(QueueError::StaleReceipt)));
    assert!(
        matches!(q.ack(&first.receipt).await, Err(QueueError::StaleReceipt)),
        "old receipt cannot delete a redelivered message"
    );
    q.ack(&second.receipt).await.unwrap();
}

#[tokio::test]
async fn dead_letters_keep_the_body() {
    let dir = tempfile::tempdir().unwrap();
    let q = SqliteQueue::new(Db::open(&dir.path().join("t.db")).unwrap(), clock(), 1);
    q.send("poison", Duration::ZERO).await.unwrap();
    let d = q.receive(1, Duration::from_secs(30), Duration::ZERO).await.unwrap().pop().unwrap();
    q.release(&d.receipt, Duration::ZERO).await.unwrap();
    assert!(q.receive(1, Duration::from_secs(30), Duration::ZERO).await.unwrap().is_empty());
    let dead = q.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].body.as_str(), dead[0].receive_count), ("poison", 1));
}

#[tokio::test]
async fn reopening_the_file_keeps_records_and_messages() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let r = pacloud_contract::record("durable");
    let in_flight_receipt;
    {
        let db = Db::open(&path).unwrap();
        let store = SqliteStore::new(db.clone());
        let q = SqliteQueue::new(db, clock(), 5);
        assert_eq!(store.create(&r).await.unwrap(), Created::New);
        q.send("visible", Duration::ZERO).await.unwrap();
        q.send("in-flight", Duration::ZERO).await.unwrap();
        let got = q.receive(10, Duration::from_millis(300), Duration::ZERO).await.unwrap();
        assert_eq!(got.len(), 2);
        q.release(&got.iter().find(|d| d.body == "visible").unwrap().receipt, Duration::ZERO).await.unwrap();
        in_flight_receipt = got.into_iter().find(|d| d.body == "in-flight").unwrap().receipt;
    }
    let db = Db::open(&path).unwrap();
    let store = SqliteStore::new(db.clone());
    let q = SqliteQueue::new(db, clock(), 5);
    assert_eq!(store.get(&r.key).await.unwrap(), Some(r), "record survives reopening");
    let got = q.receive(10, Duration::from_secs(30), Duration::ZERO).await.unwrap();
    assert_eq!(got.iter().map(|d| d.body.as_str()).collect::<Vec<_>>(), vec!["visible"], "in-flight stays invisible");
    q.extend(&in_flight_receipt, Duration::from_secs(30))
        .await
        .expect("an old process's receipt still works after reopening");
}
