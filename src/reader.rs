//! One listed file to read, handed to the sink: it asks for decoded rows or, for a CSV the
//! database can parse itself, for the raw bytes. Each call streams the object afresh.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

use crate::error::{LoadError, Stage};
use crate::format::{self, Decoded, FormatOptions, RawDecoded};
use crate::source::{ObjectMeta, Source};

pub struct FileReader<'a> {
    source: &'a Source,
    obj: &'a ObjectMeta,
    format: &'a FormatOptions,
    /// Advanced as the file is read (reset at each opening), for `/status`.
    progress: Option<ReadProgress>,
}

/// How far the current attempt of a load has read its file.
#[derive(Debug, Clone, Default)]
pub struct ReadProgress {
    /// Bytes of the object as stored (compressed for a compressed file).
    pub bytes: Arc<AtomicU64>,
    /// Data rows handed on to the database (the header not counted).
    pub rows: Arc<AtomicU64>,
}

impl<'a> FileReader<'a> {
    pub fn new(source: &'a Source, obj: &'a ObjectMeta, format: &'a FormatOptions) -> FileReader<'a> {
        FileReader {
            source,
            obj,
            format,
            progress: None,
        }
    }

    pub fn with_progress(mut self, progress: Option<ReadProgress>) -> FileReader<'a> {
        self.progress = progress;
        self
    }

    /// The key relative to `incoming/`.
    pub fn key(&self) -> &str {
        &self.obj.key
    }

    /// The file's rows, decoded on a blocking thread.
    pub async fn rows(&self) -> Result<Decoded, LoadError> {
        #[cfg(test)]
        tests::panic_if_asked(&self.obj.key);
        let (reader, encoding) = self.open().await?;
        let decoded = format::decode(reader, &self.obj.key, encoding.as_deref(), self.format.clone()).await;
        let rows = self.progress.as_ref().map(|p| p.rows.clone());
        decoded.map(|d| d.counting_rows(rows)).map_err(LoadError::from)
    }

    /// The file's bytes, decompressed, with its header and a sample read first. A transient
    /// error of stage `Decode` means the file cannot pass through: read its rows instead.
    pub async fn raw(&self) -> Result<RawDecoded, LoadError> {
        let (reader, encoding) = self.open().await?;
        let raw = format::pass_through(reader, &self.obj.key, encoding.as_deref(), self.format.clone()).await;
        let rows = self.progress.as_ref().map(|p| p.rows.clone());
        raw.map(|r| r.counting_rows(rows)).map_err(LoadError::from)
    }

    /// The object's bytes at exactly the listed version, and its Content-Encoding.
    async fn open(&self) -> Result<(Box<dyn AsyncRead + Send + Unpin>, Option<String>), LoadError> {
        let opened = self.source.open(self.obj).await;
        let opened = opened.map_err(|e| e.into_load_error(Stage::Get))?;
        let reader = match &self.progress {
            Some(progress) => {
                progress.bytes.store(0, Ordering::Relaxed);
                progress.rows.store(0, Ordering::Relaxed);
                Box::new(Counting {
                    inner: opened.reader,
                    counter: progress.bytes.clone(),
                }) as Box<dyn AsyncRead + Send + Unpin>
            }
            None => opened.reader,
        };
        Ok((reader, opened.content_encoding))
    }
}

/// Counts the bytes that pass.
struct Counting {
    inner: Box<dyn AsyncRead + Send + Unpin>,
    counter: Arc<AtomicU64>,
}

impl AsyncRead for Counting {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        self.counter.fetch_add(read as u64, Ordering::Relaxed);
        polled
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::format::RawChunk;

    /// `/status` shows a load's rows so far: both readings count the data rows they hand on
    /// (not the header), and a new opening starts again from 0.
    #[tokio::test]
    async fn progress_counts_the_rows_each_reading_hands_on() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("incoming/t")).unwrap();
        let mut csv = String::from("id,name\n");
        for i in 0..100_000 {
            csv.push_str(&format!("{i},name {i}\n"));
        }
        let path = dir.path().join("incoming/t/a.csv");
        std::fs::write(&path, &csv).unwrap();
        // Settled: written a minute ago.
        let past = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(past)
            .unwrap();
        let config = crate::config::SourceConfig {
            url: format!("file://{}", dir.path().display()),
            settle_time: std::time::Duration::ZERO,
            ..Default::default()
        };
        let source = Source::connect(&config, false).await.unwrap();
        let (listing, _) = source.list_incoming().await.unwrap();
        let listing = source.identify(listing).await;
        let format = FormatOptions::default();
        let progress = ReadProgress::default();
        let reader = FileReader::new(&source, &listing[0], &format).with_progress(Some(progress.clone()));
        let rows = || progress.rows.load(Ordering::Relaxed);

        let mut raw = reader.raw().await.unwrap();
        raw.check_types(vec![None, None]);
        let mut partway = Vec::new();
        while let RawChunk::Bytes(..) = raw.next().await.unwrap() {
            partway.push(rows());
        }
        assert!(
            partway.len() > 1 && partway[0] > 0 && partway[0] < 100_000,
            "{partway:?}"
        );
        assert_eq!(rows(), 100_000);
        assert_eq!(progress.bytes.load(Ordering::Relaxed), csv.len() as u64);

        let mut decoded = reader.rows().await.unwrap();
        assert_eq!(rows(), 0, "a new opening starts from 0");
        let mut batches = 0;
        while decoded.next_batch().await.unwrap().is_some() {
            batches += 1;
        }
        assert!(batches > 1);
        assert_eq!(rows(), 100_000);
    }

    /// Keys whose reading panics, as a bug in a decoder or a dependency would (tests only).
    pub(crate) static PANIC_ON: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

    pub(crate) fn panic_if_asked(key: &str) {
        if PANIC_ON
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|k| k == key)
        {
            panic!("injected panic while reading {key}");
        }
    }
}
