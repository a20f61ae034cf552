//! Seed 000's Rust use case, `col("value").gt(threshold)`, as a Lambda `provided` bootstrap with std only.
//!
//! The event's `config` carries `rows` (objects with a numeric `value`) and `threshold`; the answer is
//! `{"rows": [...]}`, the rows whose value is greater than the threshold, each as it came in (fields and order
//! kept). Polars would do the filter where the toolchain can fetch it; here a small JSON reader does.
//! The Runtime API part is tests/fixtures/bundles/rust_bootstrap's: raw HTTP/1.1 over TcpStream.

use std::env;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;

const API: &str = "/2018-06-01/runtime";

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

fn request(address: &str, method: &str, path: &str, body: &[u8]) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect(address)?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut headers = Vec::new();
    let mut length: Option<usize> = None;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        let text = line.trim_end();
        if text.is_empty() {
            break;
        }
        if let Some((key, value)) = text.split_once(':') {
            let (key, value) = (key.trim().to_ascii_lowercase(), value.trim().to_string());
            if key == "content-length" {
                length = value.parse().ok();
            }
            headers.push((key, value));
        }
    }
    let mut body = Vec::new();
    match length {
        Some(n) => {
            body.resize(n, 0);
            reader.read_exact(&mut body)?;
        }
        None => {
            reader.read_to_end(&mut body)?;
        }
    }
    Ok(Response { status, headers, body })
}

fn json_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}


/// A JSON value; objects keep their field order and the raw text of each value, so rows pass through unchanged.
enum Json {
    Number(f64),
    Object(Vec<(String, Json, String)>),
    Array(Vec<(Json, String)>),
    Other,
}

struct Reader<'a> {
    text: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn skip(&mut self) {
        while self.at < self.text.len() && self.text[self.at].is_ascii_whitespace() {
            self.at += 1;
        }
    }

    fn expect(&mut self, byte: u8) -> Result<(), String> {
        self.skip();
        if self.text.get(self.at) == Some(&byte) {
            self.at += 1;
            Ok(())
        } else {
            Err(format!("expected '{}' at byte {}", byte as char, self.at))
        }
    }

    fn string(&mut self) -> Result<String, String> {
        self.expect(b'"')?;
        let mut out = Vec::new();
        while let Some(&c) = self.text.get(self.at) {
            self.at += 1;
            match c {
                b'"' => return String::from_utf8(out).map_err(|e| e.to_string()),
                b'\\' => {
                    let escaped = *self.text.get(self.at).ok_or("unterminated escape")?;
                    self.at += 1;
                    match escaped {
                        b'u' => {
                            out.extend_from_slice(b"\\u");
                        }
                        b'n' => out.push(b'\n'),
                        b't' => out.push(b'\t'),
                        other => out.push(other),
                    }
                }
                c => out.push(c),
            }
        }
        Err("unterminated string".into())
    }

    fn value(&mut self) -> Result<(Json, String), String> {
        self.skip();
        let start = self.at;
        let value = match self.text.get(self.at) {
            Some(b'{') => {
                self.at += 1;
                let mut fields = Vec::new();
                self.skip();
                if self.text.get(self.at) == Some(&b'}') {
                    self.at += 1;
                } else {
                    loop {
                        let key = self.string()?;
                        self.expect(b':')?;
                        let (value, raw) = self.value()?;
                        fields.push((key, value, raw));
                        self.skip();
                        match self.text.get(self.at) {
                            Some(b',') => self.at += 1,
                            Some(b'}') => {
                                self.at += 1;
                                break;
                            }
                            _ => return Err(format!("bad object at byte {}", self.at)),
                        }
                    }
                }
                Json::Object(fields)
            }
            Some(b'[') => {
                self.at += 1;
                let mut items = Vec::new();
                self.skip();
                if self.text.get(self.at) == Some(&b']') {
                    self.at += 1;
                } else {
                    loop {
                        items.push(self.value()?);
                        self.skip();
                        match self.text.get(self.at) {
                            Some(b',') => self.at += 1,
                            Some(b']') => {
                                self.at += 1;
                                break;
                            }
                            _ => return Err(format!("bad array at byte {}", self.at)),
                        }
                    }
                }
                Json::Array(items)
            }
            Some(b'"') => {
                self.string()?;
                Json::Other
            }
            Some(_) => {
                while self.at < self.text.len() && !b",]} \t\r\n".contains(&self.text[self.at]) {
                    self.at += 1;
                }
                let token = std::str::from_utf8(&self.text[start..self.at]).map_err(|e| e.to_string())?;
                match token {
                    "true" | "false" | "null" => Json::Other,
                    _ => Json::Number(token.parse().map_err(|_| format!("bad token {token:?}"))?),
                }
            }
            None => return Err("unexpected end".into()),
        };
        let raw = String::from_utf8_lossy(&self.text[start..self.at]).into_owned();
        Ok((value, raw))
    }
}

fn field<'j>(value: &'j Json, name: &str) -> Option<&'j Json> {
    match value {
        Json::Object(fields) => fields.iter().find(|(key, _, _)| key == name).map(|(_, value, _)| value),
        _ => None,
    }
}

/// `col("value").gt(threshold)` over config.rows: the kept rows' raw JSON, in order.
fn scan(event: &[u8]) -> Result<String, String> {
    let (event, _) = Reader { text: event, at: 0 }.value()?;
    let config = field(&event, "config").ok_or("the event has no config")?;
    let threshold = match field(config, "threshold") {
        Some(Json::Number(n)) => *n,
        _ => return Err("config.threshold must be a number".into()),
    };
    let rows = match field(config, "rows") {
        Some(Json::Array(rows)) => rows,
        _ => return Err("config.rows must be an array".into()),
    };
    let kept: Vec<&str> = rows
        .iter()
        .filter(|(row, _)| matches!(field(row, "value"), Some(Json::Number(v)) if *v > threshold))
        .map(|(_, raw)| raw.as_str())
        .collect();
    Ok(format!("{{\"rows\":[{}]}}", kept.join(",")))
}

fn main() -> ExitCode {
    let address = match env::var("AWS_LAMBDA_RUNTIME_API") {
        Ok(value) => value,
        Err(_) => {
            eprintln!("rust-scan: AWS_LAMBDA_RUNTIME_API is not set");
            return ExitCode::from(2);
        }
    };
    loop {
        let next = match request(&address, "GET", &format!("{API}/invocation/next"), b"") {
            Ok(next) if next.status == 200 => next,
            _ => return ExitCode::SUCCESS, // the Runtime API is gone: the wrapper is done with us
        };
        let request_id = next.header("lambda-runtime-aws-request-id").unwrap_or("").to_string();
        let (path, body) = match scan(&next.body) {
            Ok(answer) => (format!("{API}/invocation/{request_id}/response"), answer),
            Err(message) => (
                format!("{API}/invocation/{request_id}/error"),
                format!("{{\"errorMessage\":{},\"errorType\":\"ScanError\"}}", json_string(&message)),
            ),
        };
        if let Err(err) = request(&address, "POST", &path, body.as_bytes()) {
            eprintln!("rust-scan: cannot post the answer: {err}");
            return ExitCode::from(1);
        }
    }
}
