//! CloudWatch custom metrics. At the start of every tick (and once more when the loader stops,
//! or when `once` has finished its loads) one PutMetricData call carries the backlog as it
//! stands — files listed minus files processed since — and what was loaded since the previous
//! call. The call runs in its own task under `cloudwatch.timeout`: a slow or failing CloudWatch
//! never slows loading; failures are logged and counted in `/metrics`.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use aws_sdk_cloudwatch::Client;
use aws_sdk_cloudwatch::primitives::DateTime;
use aws_sdk_cloudwatch::types::{Dimension, MetricDatum, StandardUnit, StatisticSet};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::status::Status;

pub struct Publisher {
    client: Client,
    namespace: String,
    dimensions: Vec<Dimension>,
    timeout: std::time::Duration,
    status: Arc<Status>,
    /// Counter values at the previous call, to send differences.
    last: Mutex<[u64; 3]>,
}

impl Publisher {
    pub async fn new(config: &Config, status: Arc<Status>) -> Publisher {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = &config.source.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        let sdk = loader.load().await;
        let dimensions = if config.cloudwatch.dimensions.is_empty() {
            vec![("Pipeline".to_string(), config.pipeline.clone())]
        } else {
            config
                .cloudwatch
                .dimensions
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        Publisher {
            client: Client::new(&sdk),
            namespace: config.cloudwatch.namespace.clone(),
            dimensions: dimensions
                .into_iter()
                .map(|(k, v)| Dimension::builder().name(k).value(v).build())
                .collect(),
            timeout: config.cloudwatch.timeout,
            status,
            last: Mutex::new([0; 3]),
        }
    }

    /// Takes the figures now and sends them from a task of their own.
    pub fn publish(self: &Arc<Self>) -> JoinHandle<()> {
        let data = self.datapoints();
        let this = self.clone();
        tokio::spawn(async move {
            let metrics = &this.status.metrics;
            let call = this
                .client
                .put_metric_data()
                .namespace(&this.namespace)
                .set_metric_data(Some(data))
                .send();
            match tokio::time::timeout(this.timeout, call).await {
                Ok(Ok(_)) => {
                    metrics.cloudwatch_published.inc();
                }
                Ok(Err(e)) => {
                    metrics.cloudwatch_failed.inc();
                    tracing::warn!(error.message = %crate::aws::describe(&e), "publishing CloudWatch metrics failed");
                }
                Err(_) => {
                    metrics.cloudwatch_failed.inc();
                    tracing::warn!(
                        timeout_s = this.timeout.as_secs_f64(),
                        "publishing CloudWatch metrics timed out"
                    );
                }
            }
        })
    }

    fn datapoints(&self) -> Vec<MetricDatum> {
        let s = self.status.snapshot();
        let m = &self.status.metrics;
        let now = [m.files_loaded.get(), m.rows_loaded.get(), m.files_failed.get()];
        let delta = {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            let d = [0, 1, 2].map(|i| now[i].saturating_sub(last[i]));
            *last = now;
            d
        };
        let at = DateTime::from(SystemTime::now());
        let datum = |name: &str, value: f64, unit: StandardUnit| {
            MetricDatum::builder()
                .metric_name(name)
                .set_dimensions(Some(self.dimensions.clone()))
                .timestamp(at)
                .value(value)
                .unit(unit)
                .build()
        };
        let mut data = vec![
            datum("UnprocessedFiles", s.backlog.files as f64, StandardUnit::Count),
            datum("UnprocessedBytes", s.backlog.bytes as f64, StandardUnit::Bytes),
            datum(
                "OldestUnprocessedFileAge",
                s.backlog.oldest_age_seconds.unwrap_or(0.0),
                StandardUnit::Seconds,
            ),
            datum("FilesLoaded", delta[0] as f64, StandardUnit::Count),
            datum("RowsLoaded", delta[1] as f64, StandardUnit::Count),
            datum("FilesFailed", delta[2] as f64, StandardUnit::Count),
        ];
        let window = m.take_load_window();
        if window.count > 0 {
            let stats = StatisticSet::builder()
                .sample_count(window.count as f64)
                .sum(window.sum)
                .minimum(window.min)
                .maximum(window.max)
                .build();
            data.push(
                MetricDatum::builder()
                    .metric_name("FileLoadDuration")
                    .set_dimensions(Some(self.dimensions.clone()))
                    .timestamp(at)
                    .statistic_values(stats)
                    .unit(StandardUnit::Seconds)
                    .build(),
            );
        }
        data
    }
}
