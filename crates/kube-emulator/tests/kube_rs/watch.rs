//! kube-rs watchers and reflectors against the emulator's watch implementation.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube_emulator::{Emulator, Fault};
use serde_json::json;

use crate::{backends, backends_with, eventually, on_each};

/// A pod nothing acts on: no scheduler binds it (on a real cluster kube-scheduler would
/// bind one of `default-scheduler` and kwok start it, adding events of their own).
fn pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"gen": "0"}},
        "spec": {"schedulerName": "no-scheduler", "containers": [{"name": "main", "image": "busybox"}]}
    }))
    .expect("pod")
}

/// (name -> resourceVersion) as the API server lists it.
async fn server_view(pods: &Api<Pod>) -> BTreeMap<String, String> {
    pods.list(&ListParams::default())
        .await
        .expect("list")
        .items
        .into_iter()
        .map(|p| {
            (
                p.metadata.name.unwrap_or_default(),
                p.metadata.resource_version.unwrap_or_default(),
            )
        })
        .collect()
}

fn cache_view(store: &reflector::Store<Pod>) -> BTreeMap<String, String> {
    store
        .state()
        .iter()
        .map(|p| {
            (
                p.metadata.name.clone().unwrap_or_default(),
                p.metadata.resource_version.clone().unwrap_or_default(),
            )
        })
        .collect()
}

async fn storm(pods: &Api<Pod>, round: usize, count: usize) {
    let pp = PostParams::default();
    for i in 0..count {
        pods.create(&pp, &pod(&format!("r{round}-{i}")))
            .await
            .expect("create");
    }
    for i in (0..count).step_by(2) {
        let patch = Patch::Merge(json!({"metadata": {"labels": {"gen": "1"}}}));
        pods.patch(&format!("r{round}-{i}"), &PatchParams::default(), &patch)
            .await
            .expect("modify");
    }
    for i in (0..count).step_by(3) {
        pods.delete(
            &format!("r{round}-{i}"),
            &DeleteParams::default().grace_period(0),
        )
        .await
        .expect("delete");
    }
}

/// Emulator-only: dropped watches, injected faults and compaction are hooks.
#[tokio::test]
async fn reflector_stays_consistent_through_storms_dropped_watches_and_gone() {
    let emulator = Emulator::builder()
        .bookmark_interval(Duration::from_millis(300))
        .start()
        .await
        .expect("start");
    let client = emulator.client().expect("client");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let (reader, writer) = reflector::store();
    let relists = Arc::new(AtomicUsize::new(0));
    let counter = relists.clone();
    let stream = watcher(pods.clone(), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        // Errors (injected 500s, 410 Gone) are retried by the backoff; keep consuming.
        .for_each(move |event| {
            if matches!(event, Ok(watcher::Event::Init)) {
                counter.fetch_add(1, Ordering::SeqCst);
            }
            futures::future::ready(())
        });
    let task = tokio::spawn(stream);
    reader.wait_until_ready().await.expect("initial list");

    // A storm with a dropped connection in the middle: the watcher resumes from its
    // last resourceVersion, without relisting.
    storm(&pods, 0, 60).await;
    emulator.control().drop_watches();
    storm(&pods, 1, 60).await;
    eventually("cache matches server after storm", || async {
        cache_view(&reader) == server_view(&pods).await
    })
    .await;
    assert_eq!(
        relists.load(Ordering::SeqCst),
        1,
        "resuming after a dropped watch needs no relist"
    );

    // Keep the watcher away while history is compacted: its version is gone (410),
    // so it must relist to recover.
    emulator
        .control()
        .inject(Fault::internal_errors("pods", 2).on_verb("watch"));
    emulator.control().drop_watches();
    storm(&pods, 2, 30).await;
    emulator.control().compact_history();
    eventually("watcher relists after 410 Gone", || async {
        relists.load(Ordering::SeqCst) >= 2
    })
    .await;
    storm(&pods, 3, 30).await;
    eventually("cache matches server after 410", || async {
        cache_view(&reader) == server_view(&pods).await
    })
    .await;
    assert!(!cache_view(&reader).is_empty());
    task.abort();
    emulator.shutdown().await;
}

#[tokio::test]
async fn raw_watch_semantics() {
    // Bookmarks every 200 ms on the emulator; the real server sends them about once a
    // minute, so there the loop below ends with the two changes instead of waiting.
    let builder = Emulator::builder().bookmark_interval(Duration::from_millis(200));
    on_each(backends_with("raw-watch", builder).await, async |b| {
        let pods: Api<Pod> = Api::namespaced(b.client.clone(), &b.ns);
        pods.create(&PostParams::default(), &pod("w"))
            .await
            .expect("create");
        let rv = pods
            .get("w")
            .await
            .expect("get")
            .metadata
            .resource_version
            .expect("rv");

        // Label selector transitions: leaving the selection is DELETED, re-entering is ADDED.
        let mut params = WatchParams::default().labels("gen=0");
        params.bookmarks = true;
        let mut stream = pods.watch(&params, &rv).await.expect("watch").boxed();
        pods.patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"gen": "5"}}})),
        )
        .await
        .expect("leave");
        pods.patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"gen": "0"}}})),
        )
        .await
        .expect("enter");
        // Bookmarks may arrive at any point; the changes must arrive in order.
        let rv_of = |p: &Pod| -> u64 {
            p.metadata
                .resource_version
                .as_deref()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let mut last_rv = 0u64;
        let mut kinds = Vec::new();
        loop {
            match stream
                .try_next()
                .await
                .expect("event")
                .expect("open stream")
            {
                WatchEvent::Added(p) => {
                    kinds.push("ADDED");
                    last_rv = rv_of(&p);
                }
                WatchEvent::Deleted(p) => {
                    kinds.push("DELETED");
                    last_rv = rv_of(&p);
                }
                WatchEvent::Modified(p) => {
                    kinds.push("MODIFIED");
                    last_rv = rv_of(&p);
                }
                WatchEvent::Bookmark(_) if b.is_real() => {}
                WatchEvent::Bookmark(b) => {
                    // Bookmarks arrive even when nothing changes; once both changes were
                    // replayed, a bookmark carries a version at least as new as them.
                    let bookmark_rv: u64 = b.metadata.resource_version.parse().expect("numeric rv");
                    if kinds.len() == 2 {
                        assert!(
                            bookmark_rv >= last_rv,
                            "bookmark {bookmark_rv} older than {last_rv}"
                        );
                        break;
                    }
                }
                WatchEvent::Error(e) => panic!("unexpected error {e:?}"),
            }
            if b.is_real() && kinds.len() == 2 {
                break;
            }
        }
        assert_eq!(kinds, ["DELETED", "ADDED"], "selector transitions");
        drop(stream);

        // A timed-out watch ends on its own.
        let events: Vec<_> = pods
            .watch(&WatchParams::default().timeout(1), "0")
            .await
            .expect("watch")
            .collect()
            .await;
        assert!(
            events.iter().any(|e| matches!(e, Ok(WatchEvent::Added(_)))),
            "rv=0 starts with the current objects"
        );

        // Resuming from a compacted version is 410 Gone (compaction is a hook).
        let Some(control) = b.control() else { return };
        control.compact_history();
        pods.patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
        )
        .await
        .expect("touch");
        let mut stream = pods
            .watch(&WatchParams::default(), &rv)
            .await
            .expect("watch")
            .boxed();
        match stream.try_next().await.expect("event") {
            Some(WatchEvent::Error(e)) => assert_eq!(e.code, 410),
            other => panic!("expected 410, got {other:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn streaming_list_watch_is_supported() {
    on_each(backends("streaming-list").await, async |b| {
        let client = b.client.clone();
        let pods: Api<Pod> = Api::namespaced(client.clone(), &b.ns);
        for i in 0..5 {
            pods.create(&PostParams::default(), &pod(&format!("s{i}")))
                .await
                .expect("create");
        }
        let (reader, writer) = reflector::store();
        let cfg = watcher::Config::default().streaming_lists();
        let task = tokio::spawn(
            watcher(pods.clone(), cfg)
                .default_backoff()
                .reflect(writer)
                .for_each(|_| async {}),
        );
        reader.wait_until_ready().await.expect("ready");
        assert_eq!(reader.state().len(), 5);
        pods.delete("s0", &DeleteParams::default().grace_period(0))
            .await
            .expect("delete");
        eventually("streaming reflector sees delete", || async {
            reader.state().len() == 4
        })
        .await;
        task.abort();
    })
    .await;
}

#[tokio::test]
async fn metadata_watcher_receives_partial_objects() {
    on_each(backends("metadata-watch").await, async |b| {
        let client = b.client.clone();
        let pods: Api<Pod> = Api::namespaced(client.clone(), &b.ns);
        pods.create(&PostParams::default(), &pod("m1"))
            .await
            .expect("create");
        let meta = pods.get_metadata("m1").await.expect("get_metadata");
        assert_eq!(
            meta.types.as_ref().map(|t| t.kind.as_str()),
            Some("PartialObjectMetadata")
        );
        let list = pods
            .list_metadata(&ListParams::default())
            .await
            .expect("list_metadata");
        assert_eq!(list.items.len(), 1);

        let (reader, writer) = reflector::store();
        let task = tokio::spawn(
            watcher(
                Api::<kube::core::PartialObjectMeta<Pod>>::namespaced(client.clone(), &b.ns),
                watcher::Config::default(),
            )
            .default_backoff()
            .reflect(writer)
            .for_each(|_| async {}),
        );
        reader.wait_until_ready().await.expect("ready");
        pods.create(&PostParams::default(), &pod("m2"))
            .await
            .expect("create");
        eventually("metadata reflector sees both pods", || async {
            reader.state().len() == 2
        })
        .await;
        let cached = reader.state();
        assert!(cached.iter().all(|m| {
            m.types
                .as_ref()
                .is_some_and(|t| t.api_version == "meta.k8s.io/v1")
        }));
        task.abort();
    })
    .await;
}

#[tokio::test]
async fn paginated_initial_lists_stay_consistent_under_concurrent_writes() {
    on_each(backends("pagination").await, async |b| {
        let client = b.client.clone();
        let pods: Api<Pod> = Api::namespaced(client.clone(), &b.ns);
        for i in 0..40 {
            pods.create(&PostParams::default(), &pod(&format!("page-{i:02}")))
                .await
                .expect("create");
        }
        // Continue pages report the first page's version.
        let first = pods
            .list(&ListParams::default().limit(10))
            .await
            .expect("page 1");
        pods.patch(
            "page-00",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"gen": "x"}}})),
        )
        .await
        .expect("write between pages");
        let token = first.metadata.continue_.clone().expect("more pages");
        let second = pods
            .list(&ListParams::default().limit(10).continue_token(&token))
            .await
            .expect("page 2");
        assert_eq!(
            second.metadata.resource_version,
            first.metadata.resource_version
        );

        // A reflector lists 5 at a time while a writer keeps changing early and late keys.
        let (reader, writer_store) = reflector::store();
        let task = tokio::spawn(
            watcher(pods.clone(), watcher::Config::default().page_size(5))
                .default_backoff()
                .reflect(writer_store)
                .for_each(|_| async {}),
        );
        let writer_pods = pods.clone();
        let writer = tokio::spawn(async move {
            for round in 0..60 {
                let name = format!("page-{:02}", (round * 7) % 40);
                let patch =
                    Patch::Merge(json!({"metadata": {"labels": {"gen": round.to_string()}}}));
                writer_pods
                    .patch(&name, &PatchParams::default(), &patch)
                    .await
                    .expect("modify");
                writer_pods
                    .create(&PostParams::default(), &pod(&format!("late-{round:02}")))
                    .await
                    .expect("create");
            }
        });
        writer.await.expect("writer");
        eventually("paged reflector matches the server", || async {
            cache_view(&reader) == server_view(&pods).await
        })
        .await;

        task.abort();
        // A continue token whose version left the history is 410 Gone (compaction is a hook).
        let Some(control) = b.control() else { return };
        control.compact_history();
        pods.patch(
            "page-01",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"gen": "y"}}})),
        )
        .await
        .expect("touch");
        match pods
            .list(&ListParams::default().limit(10).continue_token(&token))
            .await
        {
            Err(kube::Error::Api(s)) => assert_eq!(s.code, 410),
            other => panic!("expected 410 for an expired continue token, got {other:?}"),
        }
        task.abort();
    })
    .await;
}
