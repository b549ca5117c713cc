//! The steps of one job (placeholder until the pipeline lands).

use crate::config::Config;
use crate::jobs::{Job, JobContext, JobError, JobHandler, Outcome};

pub struct Pipeline;

impl Pipeline {
    pub fn from_config(_config: &Config) -> anyhow::Result<Self> {
        Ok(Self)
    }
}

impl JobHandler for Pipeline {
    async fn handle(&self, _job: Job, _ctx: JobContext) -> Result<Outcome, JobError> {
        Err(JobError::retryable("pipeline not implemented yet"))
    }
}
