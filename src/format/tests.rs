//! Tests of decoding whole files: compression, CSV, TSV and JSON lines, and the limits on them.

use std::io::Write;

use tokio::io::AsyncRead;

use super::*;

type Rows = Vec<Vec<Option<String>>>;

async fn decode_with(bytes: Vec<u8>, key: &str, options: FormatOptions) -> Result<(Vec<String>, Rows), DecodeFailure> {
    let reader: Box<dyn AsyncRead + Send + Unpin> = Box::new(std::io::Cursor::new(bytes));
    let mut d = super::decode(reader, key, None, options).await?;
    let mut rows = Vec::new();
    while let Some(b) = d.next_batch().await? {
        rows.extend(b.into_strings());
    }
    Ok((d.header, rows))
}

async fn decode(bytes: Vec<u8>, key: &str) -> Result<(Vec<String>, Rows), DecodeFailure> {
    decode_with(bytes, key, FormatOptions::default()).await
}

fn row(fields: &[Option<&str>]) -> Vec<Option<String>> {
    fields.iter().map(|f| f.map(str::to_string)).collect()
}

#[tokio::test]
async fn rfc4180_quotes_newlines_crlf_bom_and_nulls_decode() {
    let csv = "\u{feff}id,note,empty\r\n1,\"a, \"\"quoted\"\"\r\nline\",\r\n2,plain,\"\"\r\n";
    let (header, rows) = decode(csv.as_bytes().to_vec(), "x.csv").await.unwrap();
    assert_eq!(header, ["id", "note", "empty"]);
    assert_eq!(
        rows,
        [
            row(&[Some("1"), Some("a, \"quoted\"\r\nline"), None]),
            row(&[Some("2"), Some("plain"), Some("")])
        ]
    );
}

#[test]
fn the_format_comes_from_the_extension_under_any_compression_extension() {
    assert_eq!(Format::from_key("e/x.ndjson.gz"), Format::Jsonl);
    assert_eq!(Format::from_key("e/x.TSV"), Format::Tsv);
    assert_eq!(Format::from_key("e/x.txt"), Format::Csv);
}

#[tokio::test]
async fn the_content_encoding_picks_the_decompressor_before_the_extension() {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(b"a,b\n1,2\n").unwrap();
    let gz = gz.finish().unwrap();
    let read = |encoding: Option<&'static str>| {
        let reader: Box<dyn AsyncRead + Send + Unpin> = Box::new(std::io::Cursor::new(gz.clone()));
        super::decode(reader, "f.csv.zst", encoding, FormatOptions::default())
    };
    let mut d = read(Some("gzip")).await.unwrap();
    assert_eq!(d.header, ["a", "b"]);
    let rows = d.next_batch().await.unwrap().unwrap().into_strings();
    assert_eq!(rows, [row(&[Some("1"), Some("2")])]);
    // Without it the extension wins over the magic bytes: gzip bytes are not zstd.
    assert!(matches!(read(None).await, Err(DecodeFailure::Format(_))));
}

#[tokio::test]
async fn gzip_and_zstd_decode_by_extension_or_magic_bytes() {
    let csv = b"a,b\n1,2\n3,4\n";
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(csv).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(&csv[..], 1).unwrap();
    for (bytes, key) in [
        (gz.clone(), "f.csv.gz"),
        (gz, "f.csv"),
        (zst.clone(), "f.csv.zst"),
        (zst, "f.csv"),
    ] {
        let (header, rows) = decode(bytes, key).await.unwrap();
        assert_eq!(header, ["a", "b"], "{key}");
        assert_eq!(rows.len(), 2, "{key}");
    }
}

#[tokio::test]
async fn tsv_and_headerless_csv_with_declared_columns() {
    let (header, rows) = decode(b"a\tb\n1\t\"x\"\n".to_vec(), "f.tsv").await.unwrap();
    assert_eq!(
        (header, rows),
        (vec!["a".to_string(), "b".into()], vec![row(&[Some("1"), Some("x")])])
    );
    let options = FormatOptions {
        header: false,
        columns: vec!["x".into(), "y".into()],
        null: "\\N".into(),
        ..Default::default()
    };
    let (header, rows) = decode_with(b"1,\\N\n2,\n".to_vec(), "f.csv", options).await.unwrap();
    assert_eq!(header, ["x", "y"]);
    assert_eq!(rows, [row(&[Some("1"), None]), row(&[Some("2"), Some("")])]);
}

#[tokio::test]
async fn json_lines_decode_with_nested_values_and_nulls() {
    let jsonl = b"{\"id\": 1, \"name\": \"a\", \"tags\": [\"x\"]}\n\n{\"id\": 2.5, \"ok\": true, \"name\": null}\n";
    let reader: Box<dyn AsyncRead + Send + Unpin> = Box::new(std::io::Cursor::new(jsonl.to_vec()));
    let mut d = super::decode(reader, "e.jsonl", None, FormatOptions::default())
        .await
        .unwrap();
    assert_eq!(d.header, ["id", "name", "tags", "ok"]);
    assert_eq!(d.types, [None, Some(ColumnType::Text), Some(ColumnType::Json), None]);
    let b = d.next_batch().await.unwrap().unwrap();
    assert_eq!(b.line(1), 3);
    assert_eq!(
        b.into_strings(),
        [
            row(&[Some("1"), Some("a"), Some("[\"x\"]"), None]),
            row(&[Some("2.5"), None, None, Some("true")])
        ]
    );
}

#[tokio::test]
async fn a_blank_line_in_a_one_column_file_is_a_row_as_copy_reads_it() {
    // What PostgreSQL's own `COPY ... TO ... (FORMAT csv, HEADER)` writes for a NULL.
    let (_, rows) = decode(b"\r\nemail\r\na@x\r\n\r\nb@y\r\n\r\n".to_vec(), "x.csv")
        .await
        .unwrap();
    assert_eq!(
        rows,
        [row(&[Some("a@x")]), row(&[None]), row(&[Some("b@y")]), row(&[None])]
    );
    let options = FormatOptions {
        null: "\\N".into(),
        ..Default::default()
    };
    let (_, rows) = decode_with(b"e\na\n\nb\n".to_vec(), "x.csv", options).await.unwrap();
    assert_eq!(rows, [row(&[Some("a")]), row(&[Some("")]), row(&[Some("b")])]);
    // Wider files: a blank line holds no value and is skipped.
    let (_, rows) = decode(b"a,b\n1,2\n\n3,4\n\n".to_vec(), "x.csv").await.unwrap();
    assert_eq!(rows, [row(&[Some("1"), Some("2")]), row(&[Some("3"), Some("4")])]);
}

#[tokio::test]
async fn json_values_arrive_as_written_never_through_a_float() {
    let jsonl = concat!(
        "{\"zip\": \"08123\", \"n\": 18446744073709551615, \"x\": 1.10, \"e\": 1E2, \"j\": {\"a\": 9007199254740993}}\n",
        "{\"zip\": \"007\", \"n\": 12345678901234567890123456789012.34, \"x\": 2, \"e\": -0.0, \"j\": \"{\\\"a\\\": 2}\"}\n",
        "{\"zip\": null, \"j\": \"5\"}\n",
    );
    let (header, rows) = decode(jsonl.as_bytes().to_vec(), "e.jsonl").await.unwrap();
    assert_eq!(header, ["zip", "n", "x", "e", "j"]);
    assert_eq!(
        rows,
        [
            row(&[
                Some("08123"),
                Some("18446744073709551615"),
                Some("1.10"),
                Some("1E2"),
                Some("{\"a\": 9007199254740993}")
            ]),
            row(&[
                Some("007"),
                Some("12345678901234567890123456789012.34"),
                Some("2"),
                Some("-0.0"),
                Some("\"{\\\"a\\\": 2}\"")
            ]),
            row(&[None, None, None, None, Some("\"5\"")]),
        ]
    );
    let reader: Box<dyn AsyncRead + Send + Unpin> = Box::new(std::io::Cursor::new(jsonl.as_bytes().to_vec()));
    let d = super::decode(reader, "e.jsonl", None, FormatOptions::default())
        .await
        .unwrap();
    assert_eq!(
        d.types,
        [Some(ColumnType::Text), None, None, None, Some(ColumnType::Json)]
    );
}

#[tokio::test]
async fn a_json_line_of_only_a_byte_order_mark_or_a_repeated_key_fails() {
    for bad in [&b"{\"a\":1}\n\xef\xbb\xbf\n{\"a\":2}\n"[..], b"{\"a\":1,\"a\":2}\n"] {
        let err = decode(bad.to_vec(), "e.jsonl").await.unwrap_err();
        assert!(matches!(err, DecodeFailure::Format(_)), "{err:?}");
    }
    let (_, rows) = decode(b"\xef\xbb\xbf{\"a\":1}\n".to_vec(), "e.jsonl").await.unwrap();
    assert_eq!(rows, [row(&[Some("1")])], "a byte order mark at the start is fine");
}

#[tokio::test]
async fn a_bad_json_line_is_a_decode_error_with_its_line() {
    let err = decode(b"{\"a\":1}\n{\"a\":\n".to_vec(), "e.jsonl").await.unwrap_err();
    let DecodeFailure::Format(e) = err else {
        panic!("{err:?}")
    };
    assert_eq!((e.kind, e.line), (FileErrorKind::Decode, Some(2)));
}

#[tokio::test]
async fn a_short_row_is_a_decode_error_with_its_line() {
    let err = decode(b"a,b\n1,2\n3\n".to_vec(), "x.csv").await.unwrap_err();
    let DecodeFailure::Format(e) = err else {
        panic!("{err:?}")
    };
    assert_eq!(e.kind, FileErrorKind::Decode);
    assert_eq!((e.line, e.record), (Some(3), Some(2)));
    assert!(e.message.contains("1 fields but the header has 2"), "{}", e.message);
}

#[tokio::test]
async fn a_truncated_gzip_is_a_decode_error_not_a_retry() {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&b"a,b\n1,2\n".repeat(1000)).unwrap();
    let mut gz = gz.finish().unwrap();
    gz.truncate(gz.len() / 2);
    let err = decode(gz, "x.csv.gz").await.unwrap_err();
    assert!(
        matches!(err, DecodeFailure::Format(ref e) if e.kind == FileErrorKind::Decode),
        "{err:?}"
    );
}

#[tokio::test]
async fn invalid_utf8_and_nul_bytes_are_decode_errors() {
    let err = decode(b"a,b\n1,\xff\xfe\n".to_vec(), "x.csv").await.unwrap_err();
    assert!(
        matches!(err, DecodeFailure::Format(ref e) if e.line == Some(2)),
        "{err:?}"
    );
    // Each field on its own: `\xc3` and `\xa9` are one character only when joined.
    let err = decode(b"a,b\n\xc3,\xa9\n".to_vec(), "x.csv").await.unwrap_err();
    let DecodeFailure::Format(e) = err else {
        panic!("{err:?}")
    };
    assert_eq!((e.line, e.message.as_str()), (Some(2), "invalid UTF-8 in field 1"));
    let err = decode(b"a,b\n1,2\n3,x\x00y\n".to_vec(), "x.csv").await.unwrap_err();
    let DecodeFailure::Format(e) = err else {
        panic!("{err:?}")
    };
    assert_eq!((e.line, e.message.as_str()), (Some(3), "NUL byte in field 2"));
}

#[tokio::test]
async fn an_empty_file_has_no_columns_and_no_rows() {
    let (header, rows) = decode(Vec::new(), "x.csv").await.unwrap();
    assert!(header.is_empty() && rows.is_empty());
}

fn with_limits(limits: InputLimits) -> FormatOptions {
    FormatOptions {
        limits,
        ..Default::default()
    }
}

/// The limit error a decode ended with (panics on anything else).
fn limit_hit(result: Result<(Vec<String>, Rows), DecodeFailure>) -> FileError {
    match result {
        Err(DecodeFailure::Format(e)) if e.kind == FileErrorKind::Limit => e,
        other => panic!("expected a limit error, got {:?}", other.map(|(h, r)| (h, r.len()))),
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

#[tokio::test]
async fn a_file_that_decompresses_too_far_fails_as_a_limit_never_a_retry() {
    // About 5 MB of numbered rows: they compress a few times over.
    let csv: String = std::iter::once("n\n".to_string())
        .chain((0..700_000).map(|i| format!("{i}\n")))
        .collect();
    let (gz, zst) = (gzip(csv.as_bytes()), zstd::encode_all(csv.as_bytes(), 1).unwrap());
    for (bytes, key) in [(gz.clone(), "x.csv.gz"), (zst.clone(), "x.csv.zst")] {
        let (_, rows) = decode(bytes.clone(), key).await.unwrap();
        assert_eq!(rows.len(), 700_000, "{key} loads within the default limits");
        let ratio = InputLimits {
            compression_ratio: 1,
            ..InputLimits::default()
        };
        let e = limit_hit(decode_with(bytes.clone(), key, with_limits(ratio)).await);
        assert!(e.message.contains("limits.compression_ratio = 1 times"), "{key}: {e}");
        let size = InputLimits {
            decompressed_bytes: 100_000,
            ..InputLimits::default()
        };
        let e = limit_hit(decode_with(bytes, key, with_limits(size)).await);
        assert!(
            e.message.contains("limits.decompressed_bytes = 100000 bytes"),
            "{key}: {e}"
        );
    }
    // Under 1 MiB out, the ratio is not judged: 200 KB from a few hundred bytes loads.
    let small = gzip(format!("n\n{}", "1\n".repeat(100_000)).as_bytes());
    let ratio = InputLimits {
        compression_ratio: 1,
        ..InputLimits::default()
    };
    let (_, rows) = decode_with(small, "x.csv.gz", with_limits(ratio)).await.unwrap();
    assert_eq!(rows.len(), 100_000);
    // The passthrough reads through the same decompressor.
    let e = match open_raw(gz, "x.csv.gz", with_limits(ratio)).await {
        Err(DecodeFailure::Format(e)) => e,
        other => panic!("{:?}", other.err()),
    };
    assert_eq!(e.kind, FileErrorKind::Limit, "{e}");
}

#[tokio::test]
async fn csv_and_json_lines_over_their_limits_fail_with_a_report_naming_the_key() {
    let limits = InputLimits {
        record_bytes: 300,
        field_bytes: 100,
        columns: 5,
        json_keys: 3,
        ..InputLimits::default()
    };
    let csv = |s: &str| decode_with(s.as_bytes().to_vec(), "x.csv", with_limits(limits));
    let e = limit_hit(csv("a,b,c,d,e,f\n1,2,3,4,5,6\n").await);
    assert_eq!((e.line, e.record), (Some(1), None));
    assert_eq!(e.message, "record with more than limits.columns = 5 fields");
    let e = limit_hit(csv(&format!("a,b\n1,2\n3,{}\n", "x".repeat(101))).await);
    assert_eq!((e.line, e.record), (Some(3), Some(2)));
    assert_eq!(e.message, "field 2 longer than limits.field_bytes = 100 bytes");
    // 5 fields of 59 bytes, 4 commas and a LF: exactly 300 bytes.
    let row = |n: usize| vec!["x".repeat(n); 5].join(",");
    let (_, rows) = csv(&format!("a,b,c,d,e\n{}\n", row(59))).await.unwrap();
    assert_eq!(rows.len(), 1, "exactly at the limits loads");
    let e = limit_hit(csv(&format!("a,b,c,d,e\n{}\n{}\n", row(59), row(60))).await);
    assert_eq!((e.line, e.record), (Some(3), Some(2)));
    assert_eq!(e.message, "record longer than limits.record_bytes = 300 bytes");

    let jsonl = |s: String| decode_with(s.into_bytes(), "x.jsonl", with_limits(limits));
    let e = limit_hit(jsonl("{\"a\":1}\n{\"a\":1,\"b\":2,\"c\":3,\"d\":4}\n".into()).await);
    assert_eq!((e.line, e.record), (Some(2), Some(2)));
    assert_eq!(e.message, "JSON object with more than limits.json_keys = 3 keys");
    let e = limit_hit(jsonl(format!("{{\"a\":1}}\n{{\"a\":\"{}\"}}\n", "x".repeat(1000))).await);
    assert_eq!(e.line, Some(2));
    assert_eq!(e.message, "JSON line longer than limits.record_bytes = 300 bytes");
    let keys: String = (0..6).map(|i| format!("{{\"k{i}\":1}}\n")).collect();
    let e = limit_hit(jsonl(keys).await);
    assert_eq!(
        (e.line, e.message.as_str()),
        (Some(6), "more than limits.columns = 5 distinct keys")
    );
}

#[tokio::test]
async fn a_json_sample_of_long_lines_stops_at_sample_bytes() {
    // 20 KB lines: the sample ends after about 420 of them, so a key first seen on line 500
    // is not a column.
    let pad = "x".repeat(20_000);
    let lines: String = (1..=600)
        .map(|i| match i {
            500 => format!("{{\"a\":\"{pad}\",\"late\":1}}\n"),
            _ => format!("{{\"a\":\"{pad}\"}}\n"),
        })
        .collect();
    let err = decode(lines.into_bytes(), "x.jsonl").await.unwrap_err();
    let DecodeFailure::Format(e) = err else {
        panic!("{err:?}")
    };
    assert_eq!((e.kind, e.line), (FileErrorKind::Schema, Some(500)));
    let sampled = jsonl::SAMPLE_BYTES.div_ceil(20_009);
    assert!(
        e.message.contains(&format!("found in the first {sampled} lines")),
        "{}",
        e.message
    );
}

/// Reads `bytes` as the passthrough does, to its end or its first failure.
async fn open_raw(bytes: Vec<u8>, key: &str, options: FormatOptions) -> Result<u64, DecodeFailure> {
    let reader: Box<dyn AsyncRead + Send + Unpin> = Box::new(std::io::Cursor::new(bytes));
    let mut raw = super::pass_through(reader, key, None, options).await?;
    raw.check_types(vec![None; raw.header.len()]);
    loop {
        if let RawChunk::End { records } = raw.next().await? {
            return Ok(records);
        }
    }
}

#[tokio::test]
async fn a_limit_hit_on_the_passthrough_fails_the_file_as_the_parser_would() {
    let limits = InputLimits {
        field_bytes: 100_000,
        columns: 2,
        ..InputLimits::default()
    };
    // Past the first megabyte, read up front: the passthrough itself stops and reports.
    let mut csv = String::from("a,b\n");
    csv.extend((0..200_000).map(|i| format!("{i},{i}\n")));
    let line = 200_002;
    let long = format!("{csv}1,{}\n2,2\n", "x".repeat(200_000));
    let raw = open_raw(long.clone().into_bytes(), "x.csv", with_limits(limits)).await;
    let Err(DecodeFailure::Format(e)) = raw else {
        panic!("{:?}", raw)
    };
    assert_eq!((e.kind, e.line), (FileErrorKind::Limit, Some(line)));
    assert_eq!(e.message, "field 2 longer than limits.field_bytes = 100000 bytes");
    let parsed = limit_hit(decode_with(long.into_bytes(), "x.csv", with_limits(limits)).await);
    assert_eq!(parsed, e, "the same report either way");
    // Within the first megabyte the passthrough declines, and the parser reports it.
    let wide = "a,b,c\n1,2,3\n".to_string();
    let raw = open_raw(wide.clone().into_bytes(), "x.csv", with_limits(limits)).await;
    assert!(matches!(raw, Err(DecodeFailure::Unsuitable(_))), "{:?}", raw);
    let e = limit_hit(decode_with(wide.into_bytes(), "x.csv", with_limits(limits)).await);
    assert_eq!(e.message, "record with more than limits.columns = 2 fields");
    // Within the limits, the passthrough reads the file whole.
    assert_eq!(
        open_raw(csv.into_bytes(), "x.csv", with_limits(limits)).await.unwrap(),
        200_001
    );
}
