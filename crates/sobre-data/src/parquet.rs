//! Parquet rows as JSON values, one row group in memory at a time.
//!
//! Uses the `parquet` crate's record API (no arrow: far less to compile). Nested columns come out
//! as JSON objects and lists (verl's `reward_model.ground_truth`, TRL's message lists). Only
//! Snappy compression (pyarrow's and `datasets`' default) and uncompressed files are enabled;
//! a zstd/gzip file fails with an error that says so.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parquet::file::reader::{FileReader, SerializedFileReader};
use serde_json::Value;

use crate::dataset::{DataError, Location};

/// Iterator over the rows of a Parquet file.
pub struct ParquetRows {
    path: PathBuf,
    reader: Arc<SerializedFileReader<File>>,
    num_row_groups: usize,
    row_group: usize,
    buffered: std::vec::IntoIter<Value>,
    row_in_group: usize,
    failed: bool,
}

impl ParquetRows {
    pub fn open(path: &Path) -> Result<ParquetRows, DataError> {
        let file = File::open(path).map_err(|source| DataError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let reader = SerializedFileReader::new(file).map_err(|e| DataError::Parquet {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let num_row_groups = reader.metadata().num_row_groups();
        Ok(ParquetRows {
            path: path.to_path_buf(),
            reader: Arc::new(reader),
            num_row_groups,
            row_group: 0,
            buffered: Vec::new().into_iter(),
            row_in_group: 0,
            failed: false,
        })
    }

    /// Reads row group `i` whole. Row groups are the unit Parquet writers bound memory by
    /// (pyarrow: ≤ 1M rows), so this keeps reading streaming in practice.
    fn read_group(&self, i: usize) -> Result<Vec<Value>, DataError> {
        let err = |e: parquet::errors::ParquetError| DataError::Parquet {
            path: self.path.clone(),
            message: format!("row group {i}: {e}"),
        };
        let group = self.reader.get_row_group(i).map_err(err)?;
        let iter = group.get_row_iter(None).map_err(err)?;
        let mut rows = Vec::new();
        for row in iter {
            rows.push(row.map_err(err)?.to_json_value());
        }
        Ok(rows)
    }
}

impl Iterator for ParquetRows {
    type Item = Result<(Location, Value), DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        loop {
            if let Some(value) = self.buffered.next() {
                let location = Location::RowGroup {
                    path: self.path.clone(),
                    row_group: self.row_group - 1,
                    row: self.row_in_group,
                };
                self.row_in_group += 1;
                return Some(Ok((location, value)));
            }
            if self.row_group >= self.num_row_groups {
                return None;
            }
            match self.read_group(self.row_group) {
                Ok(rows) => {
                    self.buffered = rows.into_iter();
                    self.row_group += 1;
                    self.row_in_group = 0;
                }
                Err(e) => {
                    // A corrupt or unsupported row group ends the file: later groups cannot
                    // be trusted to line up with the schema either.
                    self.failed = true;
                    return Some(Err(e));
                }
            }
        }
    }
}
