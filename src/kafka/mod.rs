//! Kafka at the edges: the consumer-group source (`source`), the producer sink for updates,
//! tombstones and dead letters (`sink`), client configuration with librdkafka pass-through, and
//! topic administration.

pub mod reader;
pub mod sink;
pub mod source;

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

pub use sink::KafkaSink;
pub use source::{spawn_source, SourceConfig};

impl From<rdkafka::error::KafkaError> for KafkaSetupError {
    fn from(e: rdkafka::error::KafkaError) -> Self {
        Self::Kafka(e)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    /// (Not a `#[source]`: librdkafka's message already says everything, and `{:#}` would
    /// repeat it.)
    #[error("kafka: {0}")]
    Kafka(rdkafka::error::KafkaError),
    #[error("cannot create topic {topic}: {reason}")]
    Topic { topic: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}

/// Where the brokers are and what to pass through to librdkafka (`-X key=value`: SASL, TLS…).
#[derive(Debug, Clone)]
pub struct KafkaClient {
    pub brokers: String,
    pub options: Vec<(String, String)>,
}

impl KafkaClient {
    /// A librdkafka configuration: the brokers, then the pass-through options (which win).
    pub fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.options {
            c.set(k, v);
        }
        c
    }

    /// Creates the topics that do not exist yet (`check --create-topics`): (name, partitions,
    /// compacted). A compacted updates topic keeps each user's latest description and forgets
    /// users on their tombstone.
    pub async fn ensure_topics(&self, topics: &[(&str, i32, bool)], replication: i32) -> Result<(), KafkaSetupError> {
        let admin: AdminClient<DefaultClientContext> = self.config().create()?;
        let new: Vec<NewTopic> = topics
            .iter()
            .map(|(name, parts, compact)| {
                let t = NewTopic::new(name, *parts, TopicReplication::Fixed(replication));
                if *compact {
                    t.set("cleanup.policy", "compact")
                } else {
                    t
                }
            })
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        for result in admin.create_topics(&new, &opts).await? {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => return Err(KafkaSetupError::Topic { topic, reason: code.to_string() }),
            }
        }
        Ok(())
    }

    /// Partition counts of `topics` as the brokers report them (`None` for a missing topic).
    pub fn describe(&self, topics: &[&str], timeout: Duration) -> Result<Vec<Option<usize>>, KafkaSetupError> {
        let consumer: BaseConsumer = self.config().create()?;
        let md = consumer.fetch_metadata(None, timeout)?;
        Ok(topics
            .iter()
            .map(|t| md.topics().iter().find(|m| m.name() == *t && m.error().is_none()).map(|m| m.partitions().len()))
            .collect())
    }
}

/// Parses one `-X key=value`.
pub fn parse_option(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("expected key=value (a librdkafka property), got {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_and_override() {
        assert_eq!(parse_option("sasl.password=a=b").unwrap(), ("sasl.password".into(), "a=b".into()));
        assert!(parse_option("novalue").is_err());
        assert!(parse_option("=x").is_err());
        let client = KafkaClient {
            brokers: "b:9092".into(),
            options: vec![("bootstrap.servers".into(), "other:9092".into()), ("client.id".into(), "x".into())],
        };
        let c = client.config();
        assert_eq!(c.get("bootstrap.servers"), Some("other:9092"), "pass-through wins");
        assert_eq!(c.get("client.id"), Some("x"));
    }
}
