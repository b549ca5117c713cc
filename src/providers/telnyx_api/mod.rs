//! Client for the Telnyx Recordings API (`/v2/recordings`) and the presigned
//! download URLs it hands out: the requests. What an answer means is read
//! in `recording.rs` (a recording, a page of them) and `errors.rs` (error
//! classes for the job queue, retry hints).

use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use crate::config::Config;
use crate::providers::urls::{encode_segment, redact_url};

mod errors;
mod recording;

pub use errors::TelnyxError;
use errors::{check, describe_json_error, transport};
pub(crate) use recording::{DownloadUrls, Page, Recording, parse_timestamp};
use recording::{One, text};

#[derive(Debug, Clone)]
pub struct TelnyxClient {
    http: reqwest::Client,
    base: String,
    api_key: SecretString,
    request_timeout: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    /// Whole-request bound for API calls (metadata, list, delete).
    pub request: Duration,
    /// Longest silence while streaming a download; no bound on the total,
    /// since recordings can be large.
    pub read_idle: Duration,
}

impl TelnyxClient {
    /// The client `config` describes; the API key is required.
    pub fn from_config(config: &Config) -> Result<Self, TelnyxError> {
        let key = config
            .telnyx
            .api_key
            .clone()
            .ok_or(TelnyxError::NotConfigured("telnyx.api_key"))?;
        let http = &config.http;
        Self::new(
            &config.telnyx.api_url,
            key,
            Timeouts {
                connect: http.connect_timeout,
                request: http.request_timeout,
                read_idle: http.read_idle_timeout,
            },
        )
    }

    pub fn new(base: &str, api_key: SecretString, timeouts: Timeouts) -> Result<Self, TelnyxError> {
        let http = reqwest::Client::builder()
            .connect_timeout(timeouts.connect)
            .read_timeout(timeouts.read_idle)
            .user_agent(concat!("recording-relay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(transport)?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            api_key,
            request_timeout: timeouts.request,
        })
    }

    fn api(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(self.api_key.expose_secret())
            .header("accept", "application/json")
            .timeout(self.request_timeout)
    }

    /// `GET /recordings/{id}`: metadata plus fresh presigned download URLs
    /// (the ones in the webhook expire after 10 minutes).
    pub(crate) async fn get_recording(&self, id: &str) -> Result<Recording, TelnyxError> {
        let path = format!("/recordings/{}", encode_segment(id)?);
        let res = self
            .api(reqwest::Method::GET, &path)
            .send()
            .await
            .map_err(transport)?;
        let res = check(res, || format!("recording {id}")).await?;
        let mut v: Value = decode(res).await?;
        // No field is required, not even the id we asked for.
        if let Some(data) = v.get_mut("data").and_then(Value::as_object_mut)
            && text(&Value::Object(data.clone()), "id").is_none()
        {
            data.insert("id".to_owned(), Value::String(id.to_owned()));
        }
        let one: One =
            serde_json::from_value(v).map_err(|e| TelnyxError::Decode(describe_json_error(&e)))?;
        Ok(one.data)
    }

    /// `GET /recordings` with filters such as `filter[call_session_id]`.
    pub(crate) async fn list_recordings(
        &self,
        filters: &[(&str, String)],
        page_number: u32,
        page_size: u32,
    ) -> Result<Page, TelnyxError> {
        let mut query: Vec<(String, String)> = filters
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        query.push(("page[number]".to_owned(), page_number.to_string()));
        query.push(("page[size]".to_owned(), page_size.min(250).to_string()));
        let res = self
            .api(reqwest::Method::GET, "/recordings")
            .query(&query)
            .send()
            .await
            .map_err(transport)?;
        let res = check(res, || "recordings list".to_owned()).await?;
        decode(res).await
    }

    /// Recordings of one call; the webhook has the session id even when it
    /// lacks the recording id.
    pub(crate) async fn recordings_of_call(
        &self,
        call_session_id: &str,
    ) -> Result<Vec<Recording>, TelnyxError> {
        let page = self
            .list_recordings(
                &[("filter[call_session_id]", call_session_id.to_owned())],
                1,
                250,
            )
            .await?;
        Ok(page.data)
    }

    /// Recordings whose `filter` (`filter[to]` or `filter[from]`) is
    /// `number`, exactly as Telnyx writes it (the filter is case-sensitive
    /// and matches whole values), created in `created`, reading page after
    /// page of 250 up to `max_pages`. `Ok(None)`: there are more than that.
    pub(crate) async fn recordings_of_number(
        &self,
        filter: &'static str,
        number: &str,
        created: (DateTime<Utc>, DateTime<Utc>),
        max_pages: u32,
    ) -> Result<Option<Vec<Recording>>, TelnyxError> {
        const SIZE: u32 = 250;
        let stamp = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let filters = [
            (filter, number.to_owned()),
            ("filter[created_at][gte]", stamp(created.0)),
            ("filter[created_at][lte]", stamp(created.1)),
        ];
        let mut all = Vec::new();
        for number in 1..=max_pages {
            let page = self.list_recordings(&filters, number, SIZE).await?;
            let listed = page.data.len() + page.skipped;
            all.extend(page.data);
            let last = listed < SIZE as usize
                || page.meta.total_pages.is_some_and(|total| number >= total);
            if last {
                return Ok(Some(all));
            }
        }
        Ok(None)
    }

    /// `DELETE /recordings/{id}`. Already gone counts as deleted.
    pub(crate) async fn delete_recording(&self, id: &str) -> Result<(), TelnyxError> {
        let path = format!("/recordings/{}", encode_segment(id)?);
        let res = self
            .api(reqwest::Method::DELETE, &path)
            .send()
            .await
            .map_err(transport)?;
        match check(res, || format!("recording {id}")).await {
            Ok(_) | Err(TelnyxError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Starts streaming a presigned download. No API key is sent: the URL
    /// carries its own signature, and the key must not leak to the file host.
    pub async fn download(
        &self,
        url: &str,
        from_byte: u64,
    ) -> Result<reqwest::Response, TelnyxError> {
        let mut req = self.http.get(url);
        if from_byte > 0 {
            req = req.header("range", format!("bytes={from_byte}-"));
        }
        let res = req.send().await.map_err(transport)?;
        let status = res.status();
        if status == StatusCode::FORBIDDEN || status == StatusCode::UNAUTHORIZED {
            return Err(TelnyxError::DownloadDenied {
                status: status.as_u16(),
                url: redact_url(url).to_owned(),
            });
        }
        // Error answers first, like any other request's: a 429 keeps its
        // retry hint and a 404 (the recording is gone) is permanent.
        let res = check(res, || format!("recording file {}", redact_url(url))).await?;
        if from_byte > 0 && res.status() != StatusCode::PARTIAL_CONTENT {
            return Err(TelnyxError::Server {
                status: res.status().as_u16(),
                detail: "the download host ignored the Range request".to_owned(),
                retry_after: None,
            });
        }
        Ok(res)
    }
}

/// Reads a JSON answer. serde's messages quote the offending value
/// ("invalid type: integer `15557650002`, expected a string"), and these
/// answers hold phone numbers, while the message ends up in `last_error`,
/// alerts and logs: keep what was expected and where, never the value.
async fn decode<T: serde::de::DeserializeOwned>(res: reqwest::Response) -> Result<T, TelnyxError> {
    let body = read_limited(res, MAX_API_BODY).await?;
    serde_json::from_slice(&body).map_err(|e| TelnyxError::Decode(describe_json_error(&e)))
}

/// The largest API answer read (a full page of 250 recordings is ~250 KB):
/// a broken or hostile upstream must not fill our memory.
const MAX_API_BODY: usize = 16 * 1024 * 1024;

async fn read_limited(mut res: reqwest::Response, limit: usize) -> Result<Vec<u8>, TelnyxError> {
    let mut body = Vec::new();
    while let Some(chunk) = res.chunk().await.map_err(transport)? {
        if body.len().saturating_add(chunk.len()) > limit {
            return Err(TelnyxError::Decode(format!(
                "answer larger than {} MiB",
                limit / (1024 * 1024)
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
