//! Answers of the server's HTTP API checked against its own OpenAPI
//! description (`/api/v1/openapi.json`): the status must be described for
//! the route and method, and a JSON body must validate against the
//! described schema (JSON Schema 2020-12, as OpenAPI 3.1 has it).

use anyhow::{Context, Result};
use serde_json::Value;
use std::net::SocketAddr;

/// A fetched description.
pub struct Spec {
    doc: Value,
}

impl Spec {
    /// Fetches the description from a server's HTTP port.
    pub fn fetch(http: SocketAddr, token: Option<&str>) -> Result<Spec> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&http, std::time::Duration::from_secs(5))?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(
            s,
            "GET /api/v1/openapi.json HTTP/1.1\r\nHost: {http}\r\n{auth}Connection: close\r\n\r\n"
        )?;
        let mut raw = String::new();
        s.read_to_string(&mut raw)?;
        let (head, body) = raw.split_once("\r\n\r\n").context("no HTTP body")?;
        anyhow::ensure!(
            head.starts_with("HTTP/1.1 200"),
            "GET /api/v1/openapi.json: {head}"
        );
        Self::from_json(serde_json::from_str(body).context("the description is not JSON")?)
    }

    /// A description already parsed.
    pub fn from_json(doc: Value) -> Result<Spec> {
        anyhow::ensure!(
            doc["openapi"] == "3.1.0",
            "not OpenAPI 3.1: {}",
            doc["openapi"]
        );
        anyhow::ensure!(doc["paths"].is_object(), "no paths");
        Ok(Spec { doc })
    }

    /// Every (method, path template) described.
    pub fn operations(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (path, ops) in self.doc["paths"].as_object().into_iter().flatten() {
            for method in ops.as_object().into_iter().flatten().map(|(m, _)| m) {
                out.push((method.to_uppercase(), path.clone()));
            }
        }
        out
    }

    /// The content types described for an answer.
    pub fn content_types(&self, method: &str, template: &str, status: u16) -> Vec<String> {
        self.doc["paths"][template][method.to_lowercase()]["responses"][status.to_string()]
            ["content"]
            .as_object()
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The described path a concrete one matches (`{id}` takes any one
    /// segment); the query is ignored.
    pub fn template(&self, path: &str) -> Option<String> {
        let path = path.split('?').next().unwrap_or(path);
        let want: Vec<&str> = path.split('/').collect();
        self.doc["paths"]
            .as_object()?
            .keys()
            .find(|t| {
                let segs: Vec<&str> = t.split('/').collect();
                segs.len() == want.len()
                    && segs
                        .iter()
                        .zip(&want)
                        .all(|(s, w)| s == w || (s.starts_with('{') && s.ends_with('}')))
            })
            .cloned()
    }

    /// Checks one answer: its status is described for the operation, and
    /// a JSON body validates against the described schema.
    pub fn check(&self, method: &str, path: &str, status: u16, body: &Value) -> Result<(), String> {
        let t = self
            .template(path)
            .ok_or_else(|| format!("{method} {path}: no such path described"))?;
        let op = &self.doc["paths"][&t][method.to_lowercase()];
        if op.is_null() {
            return Err(format!("{method} {t}: method not described"));
        }
        let resp = &op["responses"][status.to_string()];
        if resp.is_null() {
            return Err(format!("{method} {t}: status {status} not described"));
        }
        let Some(schema) = resp["content"]["application/json"]["schema"].as_object() else {
            return Err(format!(
                "{method} {t} {status}: answered JSON, described none"
            ));
        };
        // The schema's references point into the description's components.
        let mut root = Value::Object(schema.clone());
        root["components"] = self.doc["components"].clone();
        let v = jsonschema::validator_for(&root)
            .map_err(|e| format!("{method} {t} {status}: a bad schema: {e}"))?;
        let errors: Vec<String> = v
            .iter_errors(body)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{method} {path} {status}: the body does not match its schema: {}\nbody: {body}",
                errors.join("; ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        Spec::from_json(serde_json::json!({
            "openapi": "3.1.0",
            "paths": {"/w/{id}": {"get": {"responses": {"200": {"content": {"application/json":
                {"schema": {"$ref": "#/components/schemas/W"}}}}}}}},
            "components": {"schemas": {"W": {"type": "object", "required": ["id"],
                "properties": {"id": {"type": "string"}, "n": {"type": ["integer", "null"]}}}}}
        }))
        .unwrap()
    }

    #[test]
    fn bodies_are_held_to_their_schema_and_statuses_to_the_description() {
        let s = spec();
        assert_eq!(s.template("/w/abc?x=1").as_deref(), Some("/w/{id}"));
        assert!(s
            .check(
                "GET",
                "/w/a",
                200,
                &serde_json::json!({"id": "a", "n": null})
            )
            .is_ok());
        let e = s
            .check("GET", "/w/a", 200, &serde_json::json!({"n": 3}))
            .unwrap_err();
        assert!(e.contains("does not match"), "{e}");
        let e = s
            .check("GET", "/w/a", 200, &serde_json::json!({"id": 3}))
            .unwrap_err();
        assert!(e.contains("does not match"), "{e}");
        assert!(s.check("GET", "/w/a", 404, &serde_json::json!({})).is_err());
        assert!(s.check("PUT", "/w/a", 200, &serde_json::json!({})).is_err());
        assert!(s.check("GET", "/x", 200, &serde_json::json!({})).is_err());
    }
}
