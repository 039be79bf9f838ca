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
    /// Advanced by the bytes read from the store (reset at each opening), for `/status`.
    progress: Option<Arc<AtomicU64>>,
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

    pub fn with_progress(mut self, progress: Option<Arc<AtomicU64>>) -> FileReader<'a> {
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
        decoded.map_err(LoadError::from)
    }

    /// The file's bytes, decompressed, with its header and a sample read first. A transient
    /// error of stage `Decode` means the file cannot pass through: read its rows instead.
    pub async fn raw(&self) -> Result<RawDecoded, LoadError> {
        let (reader, encoding) = self.open().await?;
        let raw = format::pass_through(reader, &self.obj.key, encoding.as_deref(), self.format.clone()).await;
        raw.map_err(LoadError::from)
    }

    /// The object's bytes at exactly the listed version, and its Content-Encoding.
    async fn open(&self) -> Result<(Box<dyn AsyncRead + Send + Unpin>, Option<String>), LoadError> {
        let opened = self.source.open(self.obj).await;
        let opened = opened.map_err(|e| e.into_load_error(Stage::Get))?;
        let reader = match &self.progress {
            Some(counter) => {
                counter.store(0, Ordering::Relaxed);
                Box::new(Counting {
                    inner: opened.reader,
                    counter: counter.clone(),
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
