//! `kubectl edgesync get --where EXPR [-l SELECTOR]`: the live state of every matching device,
//! from the controller's live API (`devicestates.live.edgesync.io`), read page by page.

use kube::Client;
use serde_json::Value;

use crate::cli::Output;
use crate::device::flatten;
use crate::table::{cell, print};

/// Devices per page asked for (the API pages them anyway).
const PAGE: usize = 500;

/// Prints the matching devices.
///
/// # Errors
/// When the live API is not served, refuses the query, or the user may not list it.
pub async fn run(
    client: Client,
    namespace: &str,
    where_: Option<&str>,
    selector: Option<&str>,
    output: Option<Output>,
) -> anyhow::Result<()> {
    let mut items: Vec<Value> = Vec::new();
    let mut continue_token: Option<String> = None;
    loop {
        let mut query = form_urlencoded::Serializer::new(String::new());
        query.append_pair("limit", &PAGE.to_string());
        if let Some(w) = where_ {
            query.append_pair("where", w);
        }
        if let Some(l) = selector {
            query.append_pair("labelSelector", l);
        }
        if let Some(c) = &continue_token {
            query.append_pair("continue", c);
        }
        let path = format!(
            "/apis/live.edgesync.io/v1alpha1/namespaces/{namespace}/devicestates?{}",
            query.finish()
        );
        let request = http::Request::get(path).body(Vec::new())?;
        let page: Value = client.request(request).await.map_err(|e| match e {
            kube::Error::Api(s) if s.code == 404 => anyhow::anyhow!(
                "the live API (devicestates.live.edgesync.io) is not served here: run the controller with --live-listen and apply deploy/base/live.yaml ({})",
                s.message
            ),
            other => other.into(),
        })?;
        items.extend(page["items"].as_array().cloned().unwrap_or_default());
        continue_token = page["metadata"]["continue"]
            .as_str()
            .filter(|c| !c.is_empty())
            .map(str::to_owned);
        if continue_token.is_none() {
            break;
        }
    }
    if matches!(output, Some(Output::Json | Output::Yaml)) {
        print(output, &[], &[], Value::Array(items));
        return Ok(());
    }
    // The values the query compares, as columns.
    let keys: Vec<String> = where_
        .unwrap_or_default()
        .split(',')
        .filter_map(|term| {
            let end = term.find(['<', '>', '=', '!'])?;
            Some(term[..end].trim().to_owned())
        })
        .filter(|k| !k.is_empty())
        .collect();
    let mut headers = vec!["NAME", "NODE", "ONLINE", "IN-SYNC", "VERSION"];
    let upper: Vec<String> = keys.iter().map(|k| k.to_uppercase()).collect();
    headers.extend(upper.iter().map(String::as_str));
    let text = |v: &Value| match v {
        Value::Bool(true) => "True".to_owned(),
        Value::Bool(false) => "False".to_owned(),
        _ => "Unknown".to_owned(),
    };
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|o| {
            let reported = o["reported"].as_object().cloned().unwrap_or_default();
            let values = flatten(&reported);
            let mut row = vec![
                cell(o["metadata"]["name"].as_str()),
                cell(o["node"].as_str()),
                text(&o["online"]),
                text(&o["inSync"]),
                cell(o["version"]["version"].as_u64()),
            ];
            row.extend(keys.iter().map(|k| {
                values
                    .iter()
                    .find(|(path, _)| path == k)
                    .map_or_else(|| "<none>".to_owned(), |(_, v)| v.clone())
            }));
            row
        })
        .collect();
    if rows.is_empty() {
        println!("No devices match in namespace {namespace}.");
        return Ok(());
    }
    print(output, &headers, &rows, Value::Null);
    Ok(())
}
