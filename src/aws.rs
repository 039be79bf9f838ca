//! AWS SDK errors as one line an operator can act on: the service's code and message (and the
//! HTTP status), else the chain of causes, never the SDK's debug structures; missing
//! credentials and a missing region said as such.

use std::error::Error;

// (The S3 client re-exports the SDK's shared types; CloudWatch's errors are the same types.)
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};

/// What went wrong with an SDK call, in one line.
pub fn describe<E>(e: &SdkError<E, HttpResponse>) -> String
where
    E: ProvideErrorMetadata + Error + 'static,
{
    if let SdkError::ServiceError(se) = e {
        let err = se.err();
        let status = status_of(e).map(|s| format!(" (HTTP {s})")).unwrap_or_default();
        return match (err.code(), err.message()) {
            (Some(code), Some(message)) => format!("{code}: {message}{status}"),
            (Some(code), None) => format!("{code}{status}"),
            _ => format!("{}{status}", causes(err)),
        };
    }
    let text = causes(e);
    let tried = "tried: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, the profile in ~/.aws (AWS_PROFILE), a \
                 web identity token (AWS_WEB_IDENTITY_TOKEN_FILE, as on EKS), the ECS task role, the EC2 instance role";
    if text.contains("no credentials found in chain") {
        return format!("no AWS credentials found ({tried})");
    }
    if text.contains("error occurred while loading credentials") {
        // The chain ended at the instance metadata service, which refused or failed.
        let last = text.rsplit(": ").next().unwrap_or_default();
        return format!("no AWS credentials found ({tried}; the last answered: {last})");
    }
    if text.contains("A region must be set") {
        return "no AWS region set: set AWS_REGION, a region in the ~/.aws profile, or source.region".into();
    }
    text
}

fn status_of<E>(e: &SdkError<E, HttpResponse>) -> Option<u16> {
    e.raw_response().map(|raw| raw.status().as_u16())
}

/// Each cause's own message, outermost first, joined by ": " (a message that repeats the one
/// before it is left out).
fn causes(e: &(dyn Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let text = err.to_string();
        if !parts.last().is_some_and(|last| last.contains(&text)) && !text.is_empty() {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}
