//! Tests of identifiers, type inference, declared limits and value conversion.

use super::*;

#[test]
fn only_plain_identifiers_are_safe() {
    for ok in ["orders", "Order_2026", "_x", &"a".repeat(63)] {
        assert!(is_safe_identifier(ok), "{ok}");
    }
    for bad in [
        "",
        "1abc",
        "a b",
        "a;drop",
        "a\"b",
        "ä",
        "a-b",
        "a.b",
        &"a".repeat(64),
        "x'--",
    ] {
        assert!(!is_safe_identifier(bad), "{bad}");
    }
}

fn infer(values: &[&str]) -> ColumnType {
    let mut inf = TypeInference::new(1);
    for v in values {
        inf.observe(0, Some(v));
    }
    inf.finish()[0]
}

#[test]
fn inference_picks_the_narrowest_type_that_fits_every_value() {
    use ColumnType::*;
    let cases: &[(&[&str], ColumnType)] = &[
        (&["1", "-7", "0"], Integer),
        (&["1.5", "2", "129.90", "2400.00"], Numeric),
        (&["12345678901234567890"], Numeric),
        (&["true", "false"], Boolean),
        (&["2026-11-01", "2026-01-31"], Date),
        (
            &[
                "2026-11-01 10:00:00",
                "2026-11-01T10:00:00.5",
                "2026-11-01T10:00:00.123456",
            ],
            Timestamp,
        ),
        (&["2026-11-01T10:00:00Z", "2026-11-01T10:00:00+02:00"], TimestampTz),
        (&["x", "1"], Text),
    ];
    for (values, want) in cases {
        assert_eq!(infer(values), *want, "{values:?}");
    }
    let mut inf = TypeInference::new(2);
    inf.observe(0, None);
    inf.observe(1, Some("1"));
    assert_eq!(inf.finish(), [Text, Integer], "a column of NULLs is text");
}

#[test]
fn inference_never_chooses_a_type_that_would_change_a_value() {
    use ColumnType::*;
    for text in [
        &["08123", "12345"][..],
        &["007"],
        &["0000001"],
        &["01779784"],
        &["+5"],
        &["-0"],
        &["-0.0"],
        &["1E2"],
        &[".5"],
        &["00.5"],
        &["1."],
        &["1-02-03"],
        &["5-6-7"],
        &["15-06-05"],
        &["2026-1-01"],
        &["0000-01-01"],
        &["2026-02-30"],
        &["9999-12-31T23:59:59.9999999Z"],
        &["2026-11-01T10:00:00.1234567"],
        &["2026-11-01T10:00"],
        &["2026-11-01T10:00:00+0200"],
        &["9999-12-31T23:00:00-02:00"],
        &["2026-12-31 23:59:60"],
        &["2026-11-01T10:00:00+16:00"],
        &["2026-11-01T10:00:00+02:60"],
        &["TRUE", "false"],
        &["True"],
        &["NaN"],
        &["inf"],
    ] {
        assert_eq!(infer(text), Text, "{text:?}");
    }
    assert_eq!(infer(&["99999999999999999999"]), Numeric);
    assert_eq!(infer(&["-9223372036854775808"]), Integer);
    assert_eq!(infer(&["9223372036854775808"]), Numeric);
}

#[test]
fn declared_limits_refuse_what_the_column_would_round_cut_or_pad() {
    let scale2 = Limits {
        scale: Some(2),
        ..Limits::default()
    };
    assert!(scale2.check("1.50").is_ok() && scale2.check("7").is_ok());
    assert!(scale2.check("1.005").is_err());
    let seconds = Limits {
        fraction: Some(0),
        ..Limits::default()
    };
    assert!(seconds.check("2026-11-01 10:00:00").is_ok());
    assert!(seconds.check("2026-11-01 10:00:00.7").is_err());
    let varchar3 = Limits {
        chars: Some(3),
        ..Limits::default()
    };
    assert!(varchar3.check("abé").is_ok() && varchar3.check("abc ").is_err());
    let char3 = Limits {
        chars: Some(3),
        exact_chars: true,
        ..Limits::default()
    };
    assert!(char3.check("abc").is_ok() && char3.check("ab").is_err());
}

#[test]
fn timestamps_parse_to_their_instant() {
    let t = parse_timestamptz("2026-11-01 10:00:00.25-03:30").unwrap();
    assert_eq!(t.naive_utc().to_string(), "2026-11-01 13:30:00.250");
    assert_eq!(
        parse_timestamptz("2026-11-01T10:00:00Z")
            .unwrap()
            .naive_utc()
            .to_string(),
        "2026-11-01 10:00:00"
    );
    assert!(
        parse_timestamptz("0001-01-01T00:30:00+01:00").is_none(),
        "year 0 in UTC"
    );
    assert_eq!(
        parse_naive_timestamp("2026-02-28T23:59:59.000001").unwrap().to_string(),
        "2026-02-28 23:59:59.000001"
    );
    assert!(
        parse_naive_timestamp("2026-02-29 00:00:00").is_none(),
        "not a leap year"
    );
    assert!(parse_naive_timestamp("2026-01-01 24:00:00").is_none());
    assert_eq!(parse_iso_date("0001-01-01").unwrap().to_string(), "0001-01-01");
}

#[test]
fn widening_goes_from_integer_to_decimal_to_text() {
    use ColumnType::*;
    assert_eq!(Integer.widened(), Some(Numeric));
    assert_eq!(Numeric.widened(), Some(Text));
    assert_eq!(Date.widened(), Some(Text));
    assert_eq!(Text.widened(), None);
}

#[test]
fn typed_values_convert_only_when_nothing_is_lost() {
    use ColumnType::*;
    assert_eq!(Integer.convert(Some("42")), Ok(Value::Integer(42)));
    assert!(Integer.convert(Some("007")).is_err());
    assert_eq!(Numeric.convert(Some("129.90")), Ok(Value::Text("129.90")));
    assert!(Numeric.convert(Some("1e3")).is_err());
    assert_eq!(Boolean.convert(Some("TRUE")), Ok(Value::Boolean(true)));
    assert!(Date.convert(Some("1-02-03")).is_err());
    assert_eq!(Text.convert(None), Ok(Value::Null));
    assert_eq!(ColumnType::from_declared("numeric(12,2)"), Some(Numeric));
    assert_eq!(ColumnType::from_declared("TEXT"), Some(Text));
    assert_eq!(ColumnType::from_declared("money"), None);
}

#[test]
fn words_like_nan_and_inf_are_not_numbers() {
    assert!(!ColumnType::Float.accepts("NaN"));
    assert!(!ColumnType::Float.accepts("inf"));
    assert!(ColumnType::Float.accepts("-0.5e-3"));
    assert!(!ColumnType::Integer.accepts("99999999999999999999"));
}

#[test]
fn each_types_name_is_one_a_route_can_declare() {
    use ColumnType::*;
    for t in [
        Integer,
        Numeric,
        Float,
        Boolean,
        Date,
        Timestamp,
        TimestampTz,
        Text,
        Json,
    ] {
        assert_eq!(ColumnType::from_declared(t.name()), Some(t), "{}", t.name());
    }
}
