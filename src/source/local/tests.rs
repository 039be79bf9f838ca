//! The local folder: paths, listing, content versions, verified reads, moves.
use super::*;
use std::os::unix::fs::MetadataExt;

use crate::source::MoveOutcome;

#[test]
fn keys_that_leave_the_root_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = LocalSource::create(dir.path(), Duration::ZERO).unwrap();
    for bad in ["../x", "a/../../x", "/etc/passwd", "", "a/./b"] {
        assert!(src.path(INCOMING, bad).is_err(), "{bad}");
    }
    assert_eq!(
        src.path(INCOMING, "a/b c.csv").unwrap(),
        src.root.join("incoming/a/b c.csv")
    );
}

#[test]
fn temp_and_hidden_names_are_not_listed() {
    for name in [".hidden.csv", "a.csv.tmp", "a.csv.part", "a.csv~", "x.PARTIAL"] {
        assert!(looks_temporary(name), "{name}");
    }
    assert!(!looks_temporary("orders.csv.gz"));
}

#[tokio::test]
async fn a_move_interrupted_after_the_link_is_finished_not_duplicated() {
    let dir = tempfile::tempdir().unwrap();
    let src = LocalSource::create(dir.path(), Duration::ZERO).unwrap();
    std::fs::create_dir_all(dir.path().join("incoming/t")).unwrap();
    std::fs::write(dir.path().join("incoming/t/a.csv"), "x\n1\n").unwrap();
    let (found, _) = src.list(INCOMING).await.unwrap();
    let found = src.identify(INCOMING, found).await;
    // The process died between linking processed/t/a.csv and removing incoming/t/a.csv.
    std::fs::create_dir_all(dir.path().join("processed/t")).unwrap();
    std::fs::hard_link(
        dir.path().join("incoming/t/a.csv"),
        dir.path().join("processed/t/a.csv"),
    )
    .unwrap();
    let outcome = crate::source::Source::Local(src)
        .move_to(&found[0], crate::source::Area::Processed)
        .await;
    assert_eq!(outcome.unwrap(), MoveOutcome::Moved { to: "t/a.csv".into() });
    assert!(!dir.path().join("incoming/t/a.csv").exists());
    assert_eq!(
        std::fs::read_dir(dir.path().join("processed/t")).unwrap().count(),
        1,
        "no second copy"
    );
}

#[tokio::test]
async fn recent_files_wait_for_the_settle_time() {
    let dir = tempfile::tempdir().unwrap();
    let src = LocalSource::create(dir.path(), Duration::from_secs(3600)).unwrap();
    std::fs::create_dir_all(dir.path().join("incoming/t")).unwrap();
    std::fs::write(dir.path().join("incoming/t/a.csv"), "x\n1\n").unwrap();
    assert!(src.list(INCOMING).await.unwrap().0.is_empty());
    let src = LocalSource::create(dir.path(), Duration::ZERO).unwrap();
    let (found, _) = src.list(INCOMING).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].key, "t/a.csv");
}

/// `incoming/t/a.csv` with `body`, listed and identified.
async fn listed(dir: &Path, body: &[u8]) -> (LocalSource, ObjectMeta) {
    let src = LocalSource::create(dir, Duration::ZERO).unwrap();
    std::fs::create_dir_all(dir.join("incoming/t")).unwrap();
    std::fs::write(dir.join("incoming/t/a.csv"), body).unwrap();
    let (found, _) = src.list(INCOMING).await.unwrap();
    let mut found = src.identify(INCOMING, found).await;
    assert_eq!(found.len(), 1);
    (src, found.remove(0))
}

async fn read_all(opened: Opened) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut { opened.reader }, &mut out).await?;
    Ok(out)
}

#[tokio::test]
async fn the_version_is_the_content_whatever_the_metadata_says() {
    let dir = tempfile::tempdir().unwrap();
    let (src, first) = listed(dir.path(), b"id\n1\n").await;
    assert_eq!(first.etag.len(), 32, "{}", first.etag);
    let path = dir.path().join("incoming/t/a.csv");
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    // Rewritten in place: same inode, same size, same mtime (as `cp -p` does).
    std::fs::write(&path, b"id\n2\n").unwrap();
    File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let (found, _) = src.list(INCOMING).await.unwrap();
    let second = src.identify(INCOMING, found).await.remove(0);
    assert_ne!(first.etag, second.etag);
    // The older version can no longer be opened or moved; the newer one reads whole.
    assert!(matches!(src.open(&first).await, Err(SourceError::Gone(_))));
    assert_eq!(
        src.move_as(INCOMING, PROCESSED, &first, "t/a.csv").await.unwrap(),
        MoveAs::SourceGone
    );
    assert_eq!(read_all(src.open(&second).await.unwrap()).await.unwrap(), b"id\n2\n");
    // The same bytes written again are the same version.
    std::fs::write(&path, b"id\n1\n").unwrap();
    let (found, _) = src.list(INCOMING).await.unwrap();
    assert_eq!(src.identify(INCOMING, found).await[0].etag, first.etag);
}

#[tokio::test]
async fn a_file_that_grows_while_it_is_read_ends_in_an_error_not_in_eof() {
    let dir = tempfile::tempdir().unwrap();
    let (src, obj) = listed(dir.path(), &vec![b'x'; 600_000]).await;
    let mut reader = src.open(&obj).await.unwrap().reader;
    let mut first = vec![0u8; 1000];
    tokio::io::AsyncReadExt::read_exact(&mut reader, &mut first)
        .await
        .unwrap();
    let mut f = File::options()
        .append(true)
        .open(dir.path().join("incoming/t/a.csv"))
        .unwrap();
    io::Write::write_all(&mut f, b"\nmore\n").unwrap();
    let mut rest = Vec::new();
    let err = tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut rest)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("changed while it was read"), "{err}");
    assert_eq!(rest.len(), 600_000 - 1000, "never past the listed length");
    // Grown before it was opened: not the listed version any more.
    assert!(matches!(src.open(&obj).await, Err(SourceError::Gone(_))));
}

#[tokio::test]
async fn a_symbolic_link_swapped_in_after_listing_is_neither_read_nor_moved() {
    let dir = tempfile::tempdir().unwrap();
    let (src, obj) = listed(dir.path(), b"id\n1\n").await;
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, b"id\n1\n").unwrap();
    let path = dir.path().join("incoming/t/a.csv");
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink(&secret, &path).unwrap();
    match src.open(&obj).await {
        Err(SourceError::Gone(m)) => assert!(m.contains("no longer a regular file"), "{m}"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a link was opened"),
    }
    assert_eq!(
        src.move_as(INCOMING, PROCESSED, &obj, "t/a.csv").await.unwrap(),
        MoveAs::SourceGone
    );
    assert!(std::fs::symlink_metadata(&path).unwrap().file_type().is_symlink());
    assert!(!dir.path().join("processed/t/a.csv").exists());
    // Identifying leaves it out altogether.
    let (found, _) = src.list(INCOMING).await.unwrap();
    assert!(found.is_empty(), "links are not listed: {found:?}");
}

/// A folder on another file system than the temporary directory (`/dev/shm`, tmpfs).
fn other_filesystem(than: &Path) -> tempfile::TempDir {
    let other = tempfile::tempdir_in("/dev/shm").expect("/dev/shm is needed for this test");
    assert_ne!(
        std::fs::metadata(other.path()).unwrap().dev(),
        std::fs::metadata(than).unwrap().dev(),
        "/dev/shm must be another file system than {}",
        than.display()
    );
    other
}

#[tokio::test]
async fn moves_across_file_systems_copy_and_an_interrupted_copy_is_finished_once() {
    let dir = tempfile::tempdir().unwrap();
    let other = other_filesystem(dir.path());
    std::os::unix::fs::symlink(other.path(), dir.path().join("processed")).unwrap();
    let body = vec![b'y'; 300_000];
    let (src, obj) = listed(dir.path(), &body).await;
    assert_eq!(
        src.move_as(INCOMING, PROCESSED, &obj, "t/a.csv").await.unwrap(),
        MoveAs::Moved
    );
    assert_eq!(std::fs::read(other.path().join("t/a.csv")).unwrap(), body);
    assert!(!dir.path().join("incoming/t/a.csv").exists());
    let leftovers: Vec<_> = std::fs::read_dir(other.path().join("t")).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "no temporary file left: {leftovers:?}");

    // A copy that completed before the process died (the source still in incoming/): the
    // next move recognises the copy as this version and only removes the source.
    let (src, obj) = listed(dir.path(), b"id\n7\n").await;
    std::fs::write(other.path().join("t/b.csv"), b"id\n7\n").unwrap();
    assert_eq!(
        src.move_as(INCOMING, PROCESSED, &obj, "t/b.csv").await.unwrap(),
        MoveAs::Taken { identical: true }
    );
    // And a different file under that name is never replaced.
    std::fs::write(dir.path().join("incoming/t/a.csv"), b"id\n8\n").unwrap();
    let (found, _) = src.list(INCOMING).await.unwrap();
    let newer = src.identify(INCOMING, found).await.remove(0);
    assert_eq!(
        src.move_as(INCOMING, PROCESSED, &newer, "t/b.csv").await.unwrap(),
        MoveAs::Taken { identical: false }
    );
    assert_eq!(std::fs::read(other.path().join("t/b.csv")).unwrap(), b"id\n7\n");
}

#[tokio::test]
async fn two_names_of_one_file_load_while_the_other_name_is_moved() {
    // Hard links to one file (as a producer, or the benchmark, may make): moving one name
    // moves the inode's ctime, which must not fail the read of the other.
    let dir = tempfile::tempdir().unwrap();
    let (src, _) = listed(dir.path(), &vec![b'z'; 700_000]).await;
    std::fs::hard_link(dir.path().join("incoming/t/a.csv"), dir.path().join("incoming/t/b.csv")).unwrap();
    let (found, _) = src.list(INCOMING).await.unwrap();
    let found = src.identify(INCOMING, found).await;
    assert_eq!(found.len(), 2);
    assert_eq!(found[0].etag, found[1].etag, "one content, one version");
    let (a, b) = if found[0].key == "t/a.csv" {
        (&found[0], &found[1])
    } else {
        (&found[1], &found[0])
    };
    let mut reader = src.open(b).await.unwrap().reader;
    let mut first = vec![0u8; 1000];
    tokio::io::AsyncReadExt::read_exact(&mut reader, &mut first)
        .await
        .unwrap();
    assert_eq!(
        src.move_as(INCOMING, PROCESSED, a, "t/a.csv").await.unwrap(),
        MoveAs::Moved
    );
    let mut rest = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut rest)
        .await
        .unwrap();
    assert_eq!(first.len() + rest.len(), 700_000);
    // And b, opened afresh after the move changed its ctime, is still the identified version.
    assert_eq!(read_all(src.open(b).await.unwrap()).await.unwrap().len(), 700_000);
}
