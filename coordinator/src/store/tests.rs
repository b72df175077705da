//! Tests of the lease book and its writer on a real file system.

use std::os::unix::fs::PermissionsExt;

use servitor_proto::agent::AttemptRef;

use super::*;

fn lease(attempt: u32, agent: Option<&str>) -> LeaseRecord {
    LeaseRecord {
        attempt,
        agent: agent.map(str::to_owned),
    }
}

fn result(job_id: i64, attempt: u32) -> Finished {
    Finished {
        attempt: Some(AttemptRef::new(job_id, attempt)),
        exit_code: Some(3),
        ..Finished::default()
    }
}

fn hold(job_id: i64) -> Change {
    Change::Hold {
        job_id,
        raw: Bytes::from(format!(r#"{{"id":{job_id},"token":"t"}}"#)),
        runner: "default".into(),
    }
}

/// A job as a restart would find it: id, lease, log, output reached, result.
type Seen = (
    i64,
    LeaseRecord,
    Vec<u8>,
    Option<(u32, u64)>,
    Option<Finished>,
);

/// What a restart would find, in a form that compares.
fn seen(store: &Store) -> Vec<Seen> {
    store
        .load()
        .unwrap()
        .into_iter()
        .map(|j| (j.job_id, j.lease, j.trace, j.output, j.result))
        .collect()
}

#[test]
fn jobs_leases_results_and_journals_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        store.submit(vec![hold(7)]).wait().unwrap();
        let mut journal = store.journal(7, 0);
        journal.append(1, 0, b"header\n").unwrap();
        store
            .submit(vec![Change::Lease {
                job_id: 7,
                lease: lease(2, Some("a-1")),
            }])
            .wait()
            .unwrap();
        journal.append(2, 5, b"hello").unwrap();
        store
            .submit(vec![Change::Result {
                job_id: 7,
                result: result(7, 2),
            }])
            .wait()
            .unwrap();
        // A job held and let go leaves nothing; late writes for it are
        // dropped rather than bringing it back.
        store.submit(vec![hold(8)]).wait().unwrap();
        store
            .submit(vec![
                Change::Remove { job_id: 8 },
                Change::Lease {
                    job_id: 8,
                    lease: lease(1, Some("a-2")),
                },
            ])
            .wait()
            .unwrap();
        store.journal(8, 0).append(1, 3, b"late").unwrap();
        store.flush_blocking();
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        seen(&store),
        vec![(
            7,
            lease(2, Some("a-1")),
            b"header\nhello".to_vec(),
            Some((2, 5)),
            Some(result(7, 2))
        )]
    );
    let stored = &store.load().unwrap()[0];
    assert_eq!(stored.raw.as_slice(), br#"{"id":7,"token":"t"}"#);
    assert_eq!(
        stored.runner.as_deref(),
        Some("default"),
        "a restart knows which runner's fleet runs the job"
    );
    let mode = std::fs::metadata(dir.path().join(BOOK_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the lease book holds job tokens");
}

#[test]
fn a_batch_of_lease_changes_costs_one_sync() {
    const CHANGES: i64 = 50;
    let dir = tempfile::tempdir().unwrap();
    // The writer is driven by hand here, so what is queued when it wakes
    // is known exactly.
    let (handle, writer) = Store::open_parts(dir.path()).unwrap();
    let store = Store {
        inner: Arc::new(handle),
    };
    let held: Vec<Commit> = (1..=CHANGES)
        .map(|id| store.submit(vec![hold(id)]))
        .collect();
    assert!(writer.run_once());
    let leases: Vec<Commit> = (1..=CHANGES)
        .map(|id| {
            store.submit(vec![Change::Lease {
                job_id: id,
                lease: lease(1, Some("agent")),
            }])
        })
        .collect();
    assert!(writer.run_once());
    for commit in held.into_iter().chain(leases) {
        commit.wait().expect("every request of a batch completes");
    }
    let counters = store.counters();
    assert_eq!(
        counters,
        StoreCounters {
            requests: 2 * CHANGES as u64,
            changes: 2 * CHANGES as u64,
            batches: 2,
            syncs: 2,
        },
        "one sync per batch, not one per change"
    );
    assert_eq!(store.durable_through(), 2 * CHANGES as u64);
    assert!(seen(&store)
        .iter()
        .all(|(_, l, ..)| *l == lease(1, Some("agent"))));
}

#[test]
fn requests_queued_while_the_disk_is_busy_share_a_commit() {
    const REQUESTS: u64 = 200;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.submit(vec![hold(1)]).wait().unwrap();
    let before = store.counters();
    let commits: Vec<Commit> = (0..REQUESTS)
        .map(|i| {
            store.submit(vec![Change::Lease {
                job_id: 1,
                lease: lease(u32::try_from(i).unwrap() + 1, Some("a")),
            }])
        })
        .collect();
    for commit in commits {
        commit.wait().unwrap();
    }
    let after = store.counters();
    assert_eq!(after.requests - before.requests, REQUESTS);
    assert!(
        after.syncs - before.syncs < REQUESTS / 2,
        "{} syncs for {REQUESTS} requests queued at once",
        after.syncs - before.syncs
    );
    // The last change submitted is the one that holds.
    assert_eq!(seen(&store)[0].1, lease(REQUESTS as u32, Some("a")));
}

#[test]
fn the_spend_ledger_is_replaced_whole() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store
        .submit(vec![
            Change::Spend {
                record: Bytes::from_static(b"{\"old\":1}"),
            },
            Change::Spend {
                record: Bytes::from_static(b"{\"new\":2}"),
            },
        ])
        .wait()
        .unwrap();
    let path = dir.path().join(SPEND_FILE);
    assert_eq!(std::fs::read(&path).unwrap(), b"{\"new\":2}");
    assert!(!path.with_extension("tmp").exists());
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn a_second_coordinator_on_the_same_state_dir_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Store::open(dir.path()).unwrap();
    let err = Store::open(dir.path()).expect_err("the book is in use");
    let text = err.to_string();
    assert!(
        text.contains("another coordinator") && text.contains("state_dir"),
        "{text}"
    );
}

/// Writes a job in the earlier layout, as the previous version did.
fn legacy_job(jobs: &Path, id: i64, lease_json: &str, journal: &[(u32, u64, &[u8])]) {
    let dir = jobs.join(id.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("job.json"), format!(r#"{{"id":{id}}}"#)).unwrap();
    std::fs::write(dir.join("lease.json"), lease_json).unwrap();
    let mut bytes = Vec::new();
    for (attempt, offset, body) in journal {
        bytes.extend_from_slice(&u32::try_from(body.len()).unwrap().to_le_bytes());
        bytes.extend_from_slice(&attempt.to_le_bytes());
        bytes.extend_from_slice(&offset.to_le_bytes());
        bytes.extend_from_slice(body);
    }
    std::fs::write(dir.join("trace.journal"), bytes).unwrap();
}

#[test]
fn a_lease_book_in_the_earlier_layout_is_imported_once() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = dir.path().join(LEGACY_DIR);
    legacy_job(
        &jobs,
        7,
        r#"{"attempt":2,"agent":"a-1"}"#,
        &[(1, 0, b"header\n"), (2, 5, b"hello")],
    );
    std::fs::write(jobs.join("7/result.pb"), result(7, 2).encode_to_vec()).unwrap();
    // A crash mid-append left a torn last record: it is dropped.
    legacy_job(
        &jobs,
        9,
        r#"{"attempt":1,"agent":null}"#,
        &[(1, 3, b"abc"), (1, 6, b"def")],
    );
    let torn = jobs.join("9/trace.journal");
    let bytes = std::fs::read(&torn).unwrap();
    std::fs::write(&torn, &bytes[..bytes.len() - 1]).unwrap();
    // A directory the crash left without a payload is skipped.
    std::fs::create_dir_all(jobs.join("11")).unwrap();

    let want = vec![
        (
            7,
            lease(2, Some("a-1")),
            b"header\nhello".to_vec(),
            Some((2, 5)),
            Some(result(7, 2)),
        ),
        (9, lease(1, None), b"abc".to_vec(), Some((1, 3)), None),
    ];
    {
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(seen(&store), want);
        assert!(
            !jobs.exists(),
            "the earlier layout is removed once imported"
        );
        // The imported journal goes on where it stopped.
        store.journal(9, 3).append(1, 9, b"ghi").unwrap();
        store.flush_blocking();
    }
    let store = Store::open(dir.path()).unwrap();
    let mut want = want;
    want[1].2 = b"abcghi".to_vec();
    want[1].3 = Some((1, 9));
    assert_eq!(seen(&store), want);
}

/// Redb's page size: the unit a disk write lands in whole or not at all.
const PAGE: usize = 4096;

/// A power loss during a commit leaves any subset of that commit's page
/// writes on disk. Every such file must open as the commit before or the
/// commit itself, never as a mix, and never fail to open.
#[test]
fn a_power_loss_leaves_the_last_commit_or_the_one_before() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(BOOK_FILE);
    let (before, after, state_before, state_after) = {
        let store = Store::open(dir.path()).unwrap();
        store.submit(vec![hold(1), hold(2)]).wait().unwrap();
        store.journal(1, 0).append(1, 4, b"one\n").unwrap();
        store.flush_blocking();
        let before = std::fs::read(&path).unwrap();
        let state_before = seen(&store);
        // The commit the power loss interrupts: a lease moves, a result
        // lands, the log grows, a job goes.
        store
            .submit(vec![
                Change::Lease {
                    job_id: 1,
                    lease: lease(2, Some("b")),
                },
                Change::Result {
                    job_id: 1,
                    result: result(1, 2),
                },
                Change::Append {
                    job_id: 1,
                    at: 4,
                    record: Bytes::from_static(b"\x02\0\0\0\x04\0\0\0\0\0\0\0two\n"),
                },
                Change::Remove { job_id: 2 },
            ])
            .wait()
            .unwrap();
        let after = std::fs::read(&path).unwrap();
        (before, after, state_before, seen(&store))
    };
    assert_ne!(state_before, state_after);
    let mut base = before.clone();
    base.resize(after.len(), 0);
    let changed: Vec<usize> = (0..after.len().div_ceil(PAGE))
        .filter(|i| {
            let r = i * PAGE..((i + 1) * PAGE).min(after.len());
            base[r.clone()] != after[r]
        })
        .collect();
    assert!(!changed.is_empty());
    let mut candidates: Vec<(String, Vec<u8>)> = vec![
        ("none of the commit".into(), before.clone()),
        ("all of the commit".into(), after.clone()),
    ];
    for &page in &changed {
        let r = page * PAGE..((page + 1) * PAGE).min(after.len());
        let mut only = base.clone();
        only[r.clone()].copy_from_slice(&after[r.clone()]);
        candidates.push((format!("only page {page}"), only));
        let mut all_but = after.clone();
        all_but[r.clone()].copy_from_slice(&base[r]);
        candidates.push((format!("all but page {page}"), all_but));
    }
    for (what, bytes) in candidates {
        let crashed = tempfile::tempdir().unwrap();
        std::fs::write(crashed.path().join(BOOK_FILE), &bytes).unwrap();
        let store = Store::open(crashed.path())
            .unwrap_or_else(|e| panic!("{what}: the lease book does not open: {e}"));
        let state = seen(&store);
        assert!(
            state == state_before || state == state_after,
            "{what}: a mix of two commits: {state:?}"
        );
    }
}

impl Store {
    /// Waits for everything submitted so far, from a test thread.
    fn flush_blocking(&self) {
        self.submit(Vec::new()).wait().unwrap();
    }
}

fn record(attempt: u32, output_offset: u64, bytes: &[u8]) -> Vec<u8> {
    let mut record = attempt.to_le_bytes().to_vec();
    record.extend_from_slice(&output_offset.to_le_bytes());
    record.extend_from_slice(bytes);
    record
}

#[tokio::test]
async fn any_part_of_a_log_is_read_back_and_an_earlier_journal_is_rekeyed() {
    let dir = tempfile::tempdir().unwrap();
    {
        // A lease book as the previous version left it: the journal keyed
        // 0, 1, 2… per job.
        let store = Store::open(dir.path()).unwrap();
        store
            .submit(vec![hold(1), hold(2)])
            .durable()
            .await
            .unwrap();
        drop(store);
        let db = redb::Database::open(dir.path().join(BOOK_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut old = txn.open_table(SEQ_JOURNAL).unwrap();
            for (key, body) in [
                ((1, 0), record(1, 4, b"one\n")),
                ((1, 1), record(1, 8, b"two\n")),
                ((2, 0), record(1, 6, b"other\n")),
                ((1, 2), record(2, 6, b"three\n")),
            ] {
                old.insert(key, body.as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let jobs = store.load().unwrap();
    assert_eq!(jobs[0].trace, b"one\ntwo\nthree\n");
    assert_eq!(jobs[0].output, Some((2, 6)));
    assert_eq!(jobs[1].trace, b"other\n");

    // It goes on after its 14 bytes; any range reads across records.
    let mut journal = store.journal(1, 14);
    journal.append(2, 11, b"four\n").unwrap();
    let whole = b"one\ntwo\nthree\nfour\n";
    for from in 0..=whole.len() {
        for max in [1, 3, 5, 100] {
            let got = journal.read(from as u64, max).await.unwrap();
            let end = (from + max).min(whole.len());
            assert_eq!(got, whole[from..end], "from {from} max {max}");
        }
    }
    assert!(store.journal(2, 6).read(6, 10).await.unwrap().is_empty());
    assert!(store.journal(3, 0).read(0, 10).await.unwrap().is_empty());
    drop(journal);
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.load().unwrap()[0].trace, whole);
}
