//! The hub process as Prometheus's own clients describe every process (`process_*`, no `hub_`
//! prefix, so that the usual dashboards and alerts find them): CPU time, memory, open files
//! against their limit, threads and the start time, read by metrics-process (from /proc on
//! Linux) at each scrape. A value the system does not give is left out, never shown as 0.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

/// Reads the process's figures when scraped; keeps nothing between scrapes.
#[derive(Debug)]
pub(super) struct Process;

impl Collector for Process {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let now = metrics_process::collector::collect();
        if let Some(seconds) = now.cpu_seconds_total {
            let metric = ConstCounter::new(seconds);
            let help = "Total user and system CPU time spent in seconds";
            metric.encode(encoder.encode_descriptor(
                "process_cpu",
                help,
                Some(&Unit::Seconds),
                MetricType::Counter,
            )?)?;
        }
        let gauges = [
            (
                "process_resident_memory",
                "Resident memory size in bytes",
                Some(Unit::Bytes),
                now.resident_memory_bytes,
            ),
            (
                "process_virtual_memory",
                "Virtual memory size in bytes",
                Some(Unit::Bytes),
                now.virtual_memory_bytes,
            ),
            ("process_open_fds", "Number of open file descriptors", None, now.open_fds),
            ("process_max_fds", "Maximum number of open file descriptors (0: unlimited)", None, now.max_fds),
            ("process_threads", "Number of OS threads in the process", None, now.threads),
            (
                "process_start_time",
                "Start time of the process since the Unix epoch in seconds",
                Some(Unit::Seconds),
                now.start_time_seconds,
            ),
        ];
        for (name, help, unit, value) in gauges {
            if let Some(value) = value {
                let metric = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
                metric.encode(encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?)?;
            }
        }
        Ok(())
    }
}
