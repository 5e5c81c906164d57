//! Reading a whole topic from outside any group, for inspection.

use crate::config::KafkaSettings;
use crate::envelope::Record;
use crate::recover::{RecoverError, TopicReader};

/// Reads every record of `topic` from the log start up to the log end seen
/// when the call starts. Blocking; call it from `spawn_blocking` in async
/// code. A read that gets no record for 60 s fails.
pub fn read_topic(kafka: &KafkaSettings, topic: &str) -> Result<Vec<Record>, RecoverError> {
    let reader = TopicReader::new(kafka, topic)?;
    let mut ranges = Vec::new();
    for partition in reader.partitions()? {
        let (low, high) = reader.watermarks(partition)?;
        ranges.push((partition, low, high));
    }
    let mut records = Vec::new();
    reader.read_ranges(&ranges, |record| {
        records.push(record);
        true
    })?;
    Ok(records)
}
