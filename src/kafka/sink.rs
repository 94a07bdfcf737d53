//! The producer side: updates (key = user id), tombstones (null value) and dead letters (the
//! original payload, the reason and the source position in headers). Every send waits for the
//! broker's acknowledgement (acks=all), because the caller commits offsets after it.

use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders, ToBytes};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use super::{KafkaClient, KafkaSetupError};
use crate::pipeline::{DeadLetter, Sink, SinkError, Update};

/// Header names on dead letters.
pub const HEADER_ERROR: &str = "prefstream.error";
pub const HEADER_SOURCE: &str = "prefstream.source";
pub const HEADER_ORIGINAL_SIZE: &str = "prefstream.original_size";
pub const HEADER_TRUNCATED: &str = "prefstream.truncated";

pub struct KafkaSink {
    producer: FutureProducer,
    updates_topic: String,
    dlq_topic: String,
    events_topic: String,
}

impl KafkaSink {
    pub fn new(
        client: &KafkaClient,
        events_topic: &str,
        updates_topic: &str,
        dlq_topic: &str,
    ) -> Result<Self, KafkaSetupError> {
        let mut cfg = client.config();
        // Delivery reports only after every in-sync replica has the message; librdkafka retries
        // until `delivery.timeout.ms`. Pass-through options may override both.
        if cfg.get("acks").is_none() {
            cfg.set("acks", "all");
        }
        if cfg.get("delivery.timeout.ms").is_none() {
            cfg.set("delivery.timeout.ms", "30000");
        }
        Ok(Self {
            producer: cfg.create()?,
            updates_topic: updates_topic.into(),
            dlq_topic: dlq_topic.into(),
            events_topic: events_topic.into(),
        })
    }

    /// Waits for queued messages (shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producer.flush(Timeout::After(timeout)) {
            tracing::warn!(error = %e, "producer flush incomplete");
        }
    }

    async fn send<K: ToBytes + ?Sized>(&self, record: FutureRecord<'_, K, [u8]>) -> Result<(), SinkError> {
        self.producer
            .send(record, Timeout::After(Duration::from_secs(30)))
            .await
            .map(|_| ())
            .map_err(|(e, _)| SinkError(format!("produce failed: {e}")))
    }
}

#[async_trait::async_trait]
impl Sink for KafkaSink {
    async fn publish_update(&self, update: &Update) -> Result<(), SinkError> {
        let payload = serde_json::to_vec(update).map_err(|e| SinkError(e.to_string()))?;
        self.send(FutureRecord::to(&self.updates_topic).key(update.user_id.as_str()).payload(payload.as_slice())).await
    }

    async fn tombstone(&self, user: &str) -> Result<(), SinkError> {
        self.send(FutureRecord::<str, [u8]>::to(&self.updates_topic).key(user)).await
    }

    async fn dead_letter(&self, letter: &DeadLetter) -> Result<(), SinkError> {
        let source = format!("{}/{}/{}", self.events_topic, letter.partition, letter.offset);
        let size = letter.original_len.to_string();
        let truncated = (letter.payload.len() < letter.original_len).to_string();
        let headers = OwnedHeaders::new()
            .insert(Header { key: HEADER_ERROR, value: Some(letter.reason.as_str()) })
            .insert(Header { key: HEADER_SOURCE, value: Some(source.as_str()) })
            .insert(Header { key: HEADER_ORIGINAL_SIZE, value: Some(size.as_str()) })
            .insert(Header { key: HEADER_TRUNCATED, value: Some(truncated.as_str()) });
        // The key may not be UTF-8: its bytes go as they came.
        let mut record =
            FutureRecord::<[u8], [u8]>::to(&self.dlq_topic).payload(letter.payload.as_slice()).headers(headers);
        if let Some(k) = letter.key.as_deref() {
            record = record.key(k);
        }
        self.send(record).await
    }
}
