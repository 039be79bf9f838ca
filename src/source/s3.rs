//! An S3 bucket (or any S3-compatible store) as the store. Listing is paginated; an object is
//! streamed with `If-Match` on the listed ETag, so what is loaded is exactly the version that was
//! listed; a move is CopyObject guarded by that ETag, then DeleteObject guarded by it too, so a
//! version a producer wrote meanwhile is never moved or deleted unloaded.
//!
//! A copy never replaces an object in `processed/` or `failed/`. Where the store is proven to
//! refuse a CopyObject onto an existing key (`If-None-Match: *`; [`S3Source::copy_guard`]
//! probes it once with objects of its own), that condition alone keeps the destination;
//! elsewhere (moto, some S3-compatible stores) each move looks at the destination before the
//! copy and again after it, and only deletes the source when its own copy is the one there.

use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use chrono::{DateTime, Utc};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use super::{INCOMING, MoveAs, ObjectMeta, Opened, Small, SourceError};
use crate::config::SourceConfig;

/// Characters left as they are in a CopyObject copy source: RFC 3986 unreserved, and `/`.
const COPY_SOURCE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'/');

pub struct S3Source {
    client: Client,
    bucket: String,
    /// Prefix under the bucket, empty or ending in `/`.
    root: String,
    id: String,
    /// See `source.conditional_copy`.
    conditional_copy: bool,
    /// What the probe found, once it found it.
    guard: tokio::sync::OnceCell<CopyGuard>,
}

/// Whether the store refuses a CopyObject onto an existing key when asked (`If-None-Match: *`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyGuard {
    /// Refused with 412, as Amazon S3 does: the condition alone protects the destination.
    Honoured,
    /// The copy replaced the object (or the store rejected the header): moves check the
    /// destination before and after copying.
    Ignored,
    /// `source.conditional_copy = false`: not probed, moves check before and after.
    Off,
}

impl S3Source {
    pub async fn connect(config: &SourceConfig, bucket: String, root: String) -> S3Source {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = &config.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(Duration::from_secs(60))
            .build();
        let sdk = loader.timeout_config(timeouts).load().await;
        let mut s3 = aws_sdk_s3::config::Builder::from(&sdk).force_path_style(config.force_path_style);
        if let Some(endpoint) = &config.endpoint {
            s3 = s3.endpoint_url(endpoint);
        }
        let id = format!("s3://{bucket}/{root}");
        S3Source {
            client: Client::from_conf(s3.build()),
            bucket,
            root,
            id,
            conditional_copy: config.conditional_copy,
            guard: tokio::sync::OnceCell::new(),
        }
    }

    /// Whether moves can rely on `If-None-Match: *`: probed once (two small objects of the
    /// loader's own under `processed/`, a conditional copy of one onto the other, both deleted),
    /// then remembered. Until a probe succeeds (the store unreachable), moves check before and
    /// after copying.
    pub async fn copy_guard(&self) -> Result<CopyGuard, SourceError> {
        if !self.conditional_copy {
            return Ok(CopyGuard::Off);
        }
        self.guard.get_or_try_init(|| self.probe_copy_guard()).await.copied()
    }

    async fn probe_copy_guard(&self) -> Result<CopyGuard, SourceError> {
        let base = format!(
            "{}{}.s3-sql-loader-probe-{:016x}",
            self.root,
            super::PROCESSED,
            rand::random::<u64>()
        );
        let (from, onto) = (format!("{base}-a"), format!("{base}-b"));
        for (key, body) in [(&from, "copy probe: source"), (&onto, "copy probe: existing")] {
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(key.as_str())
                .body(ByteStream::from(body.as_bytes().to_vec()))
                .send()
                .await
                .map_err(|e| classify(e, &format!("writing the copy probe s3://{}/{key}", self.bucket)))?;
        }
        let copied = self
            .client
            .copy_object()
            .bucket(&self.bucket)
            .key(&onto)
            .copy_source(format!("{}/{}", self.bucket, utf8_percent_encode(&from, COPY_SOURCE)))
            .if_none_match("*")
            .send()
            .await;
        let guard = match copied {
            Ok(_) => Ok(CopyGuard::Ignored),
            Err(e) => {
                let status = e.raw_response().map(|r| r.status().as_u16());
                match (status, classify(e, "the copy probe")) {
                    (Some(412), _) => Ok(CopyGuard::Honoured),
                    // Answered, but not with 412 (the header not supported, say): not honoured.
                    (Some(400..=499 | 501), _) => Ok(CopyGuard::Ignored),
                    (_, other) => Err(other),
                }
            }
        };
        for key in [&from, &onto] {
            let _ = self
                .client
                .delete_object()
                .bucket(&self.bucket)
                .key(key.as_str())
                .send()
                .await;
        }
        if let Ok(found) = &guard {
            tracing::info!(store = %self.id, copy_guard = ?found, "probed whether the store refuses copies onto existing keys");
        }
        self.sweep_abandoned_probes().await;
        guard
    }

    /// Probe objects a loader left when it was killed while probing (a probe takes
    /// milliseconds): deleted once they are a minute old, so a replica probing right now keeps
    /// its own. Best effort.
    async fn sweep_abandoned_probes(&self) {
        let prefix = format!("{}{}.s3-sql-loader-probe-", self.root, super::PROCESSED);
        let Ok(listed) = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&prefix)
            .send()
            .await
        else {
            return;
        };
        let cutoff = Utc::now() - chrono::TimeDelta::minutes(1);
        for object in listed.contents() {
            let old = object
                .last_modified()
                .and_then(|t| DateTime::<Utc>::from_timestamp(t.secs(), t.subsec_nanos()))
                .is_some_and(|t| t < cutoff);
            if let (true, Some(key)) = (old, object.key()) {
                let _ = self.client.delete_object().bucket(&self.bucket).key(key).send().await;
                tracing::info!(store.key = %key, "deleted a copy probe object an interrupted loader left");
            }
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub async fn list(&self, prefix: &str) -> Result<(Vec<ObjectMeta>, u64), SourceError> {
        let full_prefix = format!("{}{prefix}", self.root);
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full_prefix)
            .into_paginator()
            .send();
        let mut found = Vec::new();
        let mut calls = 0;
        while let Some(page) = pages.next().await {
            calls += 1;
            let page = page.map_err(|e| classify(e, &format!("listing s3://{}/{full_prefix}", self.bucket)))?;
            for object in page.contents() {
                let Some(full_key) = object.key() else { continue };
                let Some(key) = full_key.strip_prefix(&full_prefix) else {
                    continue;
                };
                if key.is_empty() || key.ends_with('/') {
                    continue; // a "folder" marker
                }
                let etag = match object.e_tag() {
                    Some(etag) => etag.to_string(),
                    // Some S3-compatible stores omit ETags in listings: ask for it.
                    None => match self.head_etag(full_key).await? {
                        Some(etag) => etag,
                        None => continue,
                    },
                };
                let last_modified = object
                    .last_modified()
                    .and_then(|t| DateTime::<Utc>::from_timestamp(t.secs(), t.subsec_nanos()))
                    .unwrap_or_else(Utc::now);
                found.push(ObjectMeta {
                    key: key.to_string(),
                    etag,
                    size: object.size().unwrap_or(0).max(0) as u64,
                    last_modified,
                });
            }
        }
        Ok((found, calls))
    }

    async fn head_etag(&self, full_key: &str) -> Result<Option<String>, SourceError> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(full_key)
            .send()
            .await
        {
            Ok(head) => Ok(head.e_tag().map(str::to_string)),
            Err(e) => match classify(e, full_key) {
                SourceError::Gone(_) => Ok(None),
                other => Err(other),
            },
        }
    }

    pub async fn open(&self, obj: &ObjectMeta) -> Result<Opened, SourceError> {
        let key = format!("{}{INCOMING}{}", self.root, obj.key);
        let response = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&key)
            .if_match(&obj.etag)
            .send()
            .await
            .map_err(|e| classify(e, &format!("getting s3://{}/{key}", self.bucket)))?;
        Ok(Opened {
            content_encoding: response.content_encoding().map(str::to_string),
            reader: Box::new(response.body.into_async_read()),
        })
    }

    /// CopyObject to `to/name` only if that name is free and the source is still the loaded
    /// version (`x-amz-copy-source-if-match`), then DeleteObject guarded by the same ETag. The
    /// name is kept free by `If-None-Match: *` where the store honours it, else by a HEAD
    /// before the copy and one after it (see the module's doc).
    pub async fn move_as(&self, from: &str, to: &str, obj: &ObjectMeta, name: &str) -> Result<MoveAs, SourceError> {
        let src = format!("{}{from}{}", self.root, obj.key);
        let dest = format!("{}{to}{name}", self.root);
        let guarded = match self.copy_guard().await {
            Ok(guard) => guard == CopyGuard::Honoured,
            Err(e) => {
                tracing::debug!(error.message = %e, "copy probe failed; checking the destination instead");
                false
            }
        };
        if !guarded && let Some(found) = self.head_etag(&dest).await? {
            return Ok(MoveAs::Taken {
                identical: super::same_version(&found, &obj.etag),
            });
        }
        // The SDK does not encode the copy source: it must be `bucket/` + the encoded key.
        let copy_source = format!("{}/{}", self.bucket, utf8_percent_encode(&src, COPY_SOURCE));
        let copied = self
            .client
            .copy_object()
            .bucket(&self.bucket)
            .key(&dest)
            .copy_source(copy_source)
            .copy_source_if_match(&obj.etag)
            .if_none_match("*")
            .send()
            .await;
        let copied = match copied {
            Ok(copied) => copied,
            Err(e) => {
                let what = format!("copying s3://{}/{src} to {dest}", self.bucket);
                return match classify(e, &what) {
                    // 412 means the source changed or the destination exists: find out which.
                    SourceError::Gone(_) => {
                        if self.head_etag(&src).await?.as_deref() != Some(obj.etag.as_str()) {
                            Ok(MoveAs::SourceGone)
                        } else if let Some(found) = self.head_etag(&dest).await? {
                            Ok(MoveAs::Taken {
                                identical: super::same_version(&found, &obj.etag),
                            })
                        } else {
                            Err(SourceError::Transient(format!(
                                "{what}: precondition failed; will retry"
                            )))
                        }
                    }
                    other => Err(other),
                };
            }
        };
        if !guarded {
            // Another writer may have put an object there between the HEAD and the copy (then
            // one of the two copies replaced the other). The source is deleted only if the
            // object there now is this copy; otherwise the file stays and its next move goes
            // to another name.
            let ours = copied.copy_object_result().and_then(|r| r.e_tag());
            let now = self.head_etag(&dest).await?;
            let still_ours = match (ours, now.as_deref()) {
                (Some(ours), Some(now)) => ours == now,
                // No ETag in the copy's answer (some stores): the loaded version's, when it can
                // be compared (not multipart).
                (None, Some(now)) => super::same_version(now, &obj.etag),
                (_, None) => false,
            };
            if !still_ours {
                tracing::warn!(store.key = %dest, "another object took the destination during the move; the file stays for another name");
                return Ok(MoveAs::Taken { identical: false });
            }
        }
        self.delete_version(from, obj).await?;
        Ok(MoveAs::Moved)
    }

    /// Deletes `from/K` only if it still is this version (`If-Match`).
    pub async fn delete_version(&self, from: &str, obj: &ObjectMeta) -> Result<(), SourceError> {
        let src = format!("{}{from}{}", self.root, obj.key);
        let deleted = self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(&src)
            .if_match(&obj.etag)
            .send()
            .await;
        match deleted {
            Ok(_) => Ok(()),
            Err(e) => match classify(e, &format!("deleting s3://{}/{src}", self.bucket)) {
                // Overwritten by a producer after the copy: the new version stays for its own load.
                SourceError::Gone(m) => {
                    tracing::info!(store.key = %src, reason = %m, "left a newer version in place after moving the loaded one");
                    Ok(())
                }
                other => Err(other),
            },
        }
    }

    /// The ETag of the object at `path` (relative to the root), if there is one.
    /// The object at `area` + `key`, if there is one.
    pub async fn meta_at(&self, area: &str, key: &str) -> Result<Option<ObjectMeta>, SourceError> {
        let full_key = format!("{}{area}{key}", self.root);
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&full_key)
            .send()
            .await
        {
            Ok(head) => Ok(head.e_tag().map(|etag| ObjectMeta {
                key: key.to_string(),
                etag: etag.to_string(),
                size: head.content_length().unwrap_or(0).max(0) as u64,
                last_modified: head
                    .last_modified()
                    .and_then(|t| DateTime::<Utc>::from_timestamp(t.secs(), t.subsec_nanos()))
                    .unwrap_or_else(Utc::now),
            })),
            Err(e) => match classify(e, &full_key) {
                SourceError::Gone(_) => Ok(None),
                other => Err(other),
            },
        }
    }

    pub async fn etag_at(&self, path: &str) -> Result<Option<String>, SourceError> {
        self.head_etag(&format!("{}{path}", self.root)).await
    }

    pub async fn put(&self, path: &str, body: Vec<u8>) -> Result<(), SourceError> {
        let key = format!("{}{path}", self.root);
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&key)
            .content_type("application/json")
            .body(ByteStream::from(body))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify(e, &format!("writing s3://{}/{key}", self.bucket)))
    }

    /// The object at `path` if it holds at most `max` bytes (a HEAD first, so a large object
    /// is never fetched).
    pub async fn read_small(&self, path: &str, max: u64) -> Result<Small, SourceError> {
        let key = format!("{}{path}", self.root);
        let what = format!("reading s3://{}/{key}", self.bucket);
        let head = match self.client.head_object().bucket(&self.bucket).key(&key).send().await {
            Ok(head) => head,
            Err(e) => {
                return match classify(e, &what) {
                    SourceError::Gone(_) => Ok(Small::Absent),
                    other => Err(other),
                };
            }
        };
        if head.content_length().is_none_or(|n| n < 0 || n as u64 > max) {
            return Ok(Small::TooLarge);
        }
        let mut request = self.client.get_object().bucket(&self.bucket).key(&key);
        if let Some(etag) = head.e_tag() {
            request = request.if_match(etag);
        }
        let object = match request.send().await {
            Ok(object) => object,
            Err(e) => {
                return match classify(e, &what) {
                    SourceError::Gone(_) => Ok(Small::Absent),
                    other => Err(other),
                };
            }
        };
        let body = object
            .body
            .collect()
            .await
            .map_err(|e| SourceError::Transient(format!("{what}: {e}")))?;
        let body = body.into_bytes().to_vec();
        Ok(if body.len() as u64 > max {
            Small::TooLarge
        } else {
            Small::Body(body)
        })
    }

    pub async fn delete(&self, path: &str) -> Result<(), SourceError> {
        let key = format!("{}{path}", self.root);
        match self.client.delete_object().bucket(&self.bucket).key(&key).send().await {
            Ok(_) => Ok(()),
            Err(e) => match classify(e, &format!("deleting s3://{}/{key}", self.bucket)) {
                SourceError::Gone(_) => Ok(()),
                other => Err(other),
            },
        }
    }

    pub async fn check(&self) -> Result<(), SourceError> {
        self.client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(format!("{}{INCOMING}", self.root))
            .max_keys(1)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify(e, &format!("listing s3://{}/{}{INCOMING}", self.bucket, self.root)))
    }
}

/// Sorts an SDK error into retry, the file's fault, or gone.
fn classify<E>(e: SdkError<E, HttpResponse>, what: &str) -> SourceError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let status = match &e {
        SdkError::ServiceError(se) => Some(se.raw().status().as_u16()),
        SdkError::ResponseError(re) => Some(re.raw().status().as_u16()),
        _ => None,
    };
    let code = e
        .as_service_error()
        .and_then(|se| se.code())
        .unwrap_or_default()
        .to_string();
    let message = format!("{what}: {}", crate::aws::describe(&e));
    match (status, code.as_str()) {
        (Some(404), _) | (_, "NoSuchKey") | (Some(412), _) | (_, "PreconditionFailed") => SourceError::Gone(message),
        (Some(403), _) | (_, "AccessDenied") => SourceError::Denied(message),
        _ => SourceError::Transient(message),
    }
}
