//! Requests to routes: authentication, and the early refusals the real
//! server gives before reading a body.

use super::*;

pub(super) enum Route {
    CreateBucket,
    GetBucket(String),
    Upload {
        bucket: String,
        name: String,
        put: bool,
    },
    Delete {
        bucket: String,
        name: String,
    },
    Info {
        bucket: String,
        name: String,
    },
    Download {
        bucket: String,
        name: String,
        public: bool,
    },
    Sign {
        bucket: String,
        name: String,
    },
    /// `POST /object/copy`: the keys are in the JSON body.
    Copy,
    Signed {
        bucket: String,
        name: String,
    },
    TusCreate,
    TusHead(String),
    TusPatch(String),
    TusDelete(String),
    NotFound,
}

impl Route {
    pub(super) fn is_upload(&self) -> bool {
        matches!(
            self,
            Route::Upload { .. } | Route::TusCreate | Route::TusPatch(_)
        )
    }

    pub(super) fn is_tus(&self) -> bool {
        matches!(
            self,
            Route::TusCreate | Route::TusHead(_) | Route::TusPatch(_) | Route::TusDelete(_)
        )
    }

    pub(super) fn needs_auth(&self) -> bool {
        !matches!(
            self,
            Route::Signed { .. } | Route::Download { public: true, .. } | Route::NotFound
        )
    }
}

pub(super) fn split_object(rest: &str) -> Option<(String, String)> {
    let (b, n) = rest.split_once('/')?;
    let (b, n) = (percent_decode(b, false), percent_decode(n, false));
    (!b.is_empty() && !n.is_empty()).then_some((b, n))
}

pub(super) fn route(method: &Method, path: &str) -> Route {
    if let Some(rest) = path.strip_prefix("/bucket") {
        return match (rest.trim_end_matches('/'), method) {
            ("", &Method::POST) => Route::CreateBucket,
            (r, &Method::GET) => match r.strip_prefix('/') {
                Some(id) if !id.is_empty() && !id.contains('/') => {
                    Route::GetBucket(percent_decode(id, false))
                }
                _ => Route::NotFound,
            },
            _ => Route::NotFound,
        };
    }
    if let Some(rest) = path.strip_prefix("/upload/resumable") {
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() {
            return if method == Method::POST {
                Route::TusCreate
            } else {
                Route::NotFound
            };
        }
        return match rest.strip_prefix('/') {
            Some(id) if !id.contains('/') => match *method {
                Method::HEAD => Route::TusHead(id.to_owned()),
                Method::PATCH => Route::TusPatch(id.to_owned()),
                Method::DELETE => Route::TusDelete(id.to_owned()),
                _ => Route::NotFound,
            },
            _ => Route::NotFound,
        };
    }
    let Some(rest) = path.strip_prefix("/object/") else {
        return Route::NotFound;
    };
    // storage-api's exact route: `/object/copy/{name}` is an upload into a
    // bucket named `copy`.
    if rest == "copy" && *method == Method::POST {
        return Route::Copy;
    }
    let obj = |r: &str| split_object(r);
    if let Some(r) = rest.strip_prefix("sign/") {
        return match (obj(r), method) {
            (Some((bucket, name)), &Method::POST) => Route::Sign { bucket, name },
            (Some((bucket, name)), &Method::GET) => Route::Signed { bucket, name },
            _ => Route::NotFound,
        };
    }
    if *method == Method::GET {
        let info = rest
            .strip_prefix("info/authenticated/")
            .or_else(|| rest.strip_prefix("info/"));
        if let Some(r) = info {
            return obj(r).map_or(Route::NotFound, |(bucket, name)| Route::Info {
                bucket,
                name,
            });
        }
        let (r, public) = if let Some(r) = rest.strip_prefix("authenticated/") {
            (r, false)
        } else if let Some(r) = rest.strip_prefix("public/") {
            (r, true)
        } else {
            (rest, false)
        };
        return obj(r).map_or(Route::NotFound, |(bucket, name)| Route::Download {
            bucket,
            name,
            public,
        });
    }
    match (obj(rest), method) {
        (Some((bucket, name)), &Method::POST) => Route::Upload {
            bucket,
            name,
            put: false,
        },
        (Some((bucket, name)), &Method::PUT) => Route::Upload {
            bucket,
            name,
            put: true,
        },
        (Some((bucket, name)), &Method::DELETE) => Route::Delete { bucket, name },
        _ => Route::NotFound,
    }
}

pub(super) async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Resp, Abort> {
    let path = req.uri().path().to_owned();
    let route = match path.strip_prefix("/storage/v1") {
        Some(rest) => route(req.method(), rest),
        None => Route::NotFound,
    };
    let fault = {
        let mut g = state.lock();
        g.requests.push(path.clone());
        if matches!(route, Route::TusPatch(_)) {
            g.tus_patches += 1;
        }
        if route.is_upload() {
            g.upload_faults.next()
        } else {
            g.other_faults.next()
        }
    };
    let (mut upload_cut, mut response_cut) = (None, None);
    match start_fault(fault, &state.cancel).await {
        FaultAction::None => {}
        FaultAction::Reset => return Err(Abort),
        FaultAction::Status(s) => {
            let mut body = req.into_body();
            drain(&mut body).await;
            return Ok(fault_response(s, route.is_tus()));
        }
        FaultAction::CutAfter(n) if route.is_upload() => upload_cut = Some(n),
        FaultAction::CutAfter(n) => response_cut = Some(n),
    }
    let resp = dispatch(&state, route, req, upload_cut).await?;
    Ok(match response_cut {
        Some(n) => cut_response(resp, n),
        None => resp,
    })
}

pub(super) async fn dispatch(
    state: &Arc<State>,
    route: Route,
    req: Request<Incoming>,
    cut: Option<u64>,
) -> Result<Resp, Abort> {
    let (parts, mut body) = req.into_parts();
    let headers = &parts.headers;
    if route.needs_auth()
        && let Err(e) = check_auth(state, headers)
    {
        if matches!(route, Route::Upload { .. }) {
            return Ok(refuse_unread(state, body, e.json()));
        }
        drain(&mut body).await;
        return Ok(e.json());
    }
    match route {
        Route::NotFound => {
            drain(&mut body).await;
            Ok(json_response(
                404,
                &json!({ "message": format!("Route {}:{} not found", parts.method, parts.uri.path()), "error": "Not Found", "statusCode": 404 }),
            ))
        }
        Route::CreateBucket => create_bucket(state, body).await,
        Route::GetBucket(id) => Ok(get_bucket(state, &id)),
        Route::Upload { bucket, name, put } => {
            upload(state, headers, body, &bucket, &name, put, cut).await
        }
        Route::Delete { bucket, name } => Ok(delete_object(state, &bucket, &name).await),
        Route::Info { bucket, name } => Ok(info(state, &bucket, &name)),
        Route::Download {
            bucket,
            name,
            public,
        } => Ok(download(state, headers, &bucket, &name, public).await),
        Route::Sign { bucket, name } => sign(state, body, &bucket, &name).await,
        Route::Copy => copy_object(state, headers, body).await,
        Route::Signed { bucket, name } => {
            Ok(signed_download(state, &parts.uri, headers, &bucket, &name).await)
        }
        Route::TusCreate => Ok(tus_create(state, headers, body).await),
        Route::TusHead(id) => Ok(tus_head(state, &id)),
        Route::TusPatch(id) => tus_patch(state, headers, body, &id, cut).await,
        Route::TusDelete(id) => Ok(tus_delete(state, &id)),
    }
}

pub(super) fn check_auth(state: &State, headers: &HeaderMap) -> Result<(), StorageErr> {
    // Messages are the ones jsonwebtoken gives storage-api for these cases.
    match bearer(headers) {
        None | Some("") => return Err(StorageErr::AccessDenied("jwt must be provided")),
        Some(t) if t != state.service_key => {
            return Err(StorageErr::AccessDenied("invalid signature"));
        }
        Some(_) => {}
    }
    match header_str(headers, "apikey") {
        None | Some("") => Err(StorageErr::AccessDenied("No API key found in request")),
        Some(k) if k != state.service_key => Err(StorageErr::AccessDenied("Invalid API key")),
        Some(_) => Ok(()),
    }
}

pub(super) fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}
