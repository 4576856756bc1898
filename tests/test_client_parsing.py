"""The client's parsing, without a server: command lines and scripts (shell quoting), command
options, dates, completion, CSV, and where the settings come from (flags, environment,
profile)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import uuid
from pathlib import Path

import pytest

from p2ppay import wire as p
from p2ppay.cli.main import build_parser, client_options
from p2ppay.cli.profiles import Profile, ProfileError, load_profile, parse_server, resolve
from p2ppay.cli.shell import (
    CSV_HEADER,
    UsageError,
    complete,
    csv_rows,
    parse_args,
    parse_payment_id,
    parse_since,
    parse_until,
    split_commands,
    split_words,
)

PID = "12345678-1234-5678-1234-567812345678"


# --- command lines and scripts ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "commands"),
    [
        ("deposit 5; list", ["deposit 5", "list"]),
        ("deposit 5\nlist;;\n balance ", ["deposit 5", "list", "balance"]),
        ('history --with "bob"; list', ['history --with "bob"', "list"]),
        ("pay bob 5 --memo 'a; b'; list", ["pay bob 5 --memo 'a; b'", "list"]),
        ('pay bob 5 --memo "x\\"; y"; list', ['pay bob 5 --memo "x\\"; y"', "list"]),
        ("pay bob 5 --memo a\\;b", ["pay bob 5 --memo a\\;b"]),
        ("pay bob 5 --memo 'it\\'; list", ["pay bob 5 --memo 'it\\'", "list"]),
        ("status 'x; list", ["status 'x; list"]),  # never closed: the rest is one command
        ("", []),
    ],
)
def test_a_script_splits_on_unquoted_separators(script: str, commands: list[str]) -> None:
    assert split_commands(script) == commands


def test_words_are_split_like_a_shell() -> None:
    assert split_words('pay bob 5 --memo "lunch at noon"') == [
        "pay",
        "bob",
        "5",
        "--memo",
        "lunch at noon",
    ]
    assert split_words("history --with 'bob'  --csv") == ["history", "--with", "bob", "--csv"]
    assert split_words("say it\\ all # not a comment") == [
        "say",
        "it all",
        "#",
        "not",
        "a",
        "comment",
    ]
    assert split_words("   ") == []
    with pytest.raises(UsageError, match="a quote is not closed"):
        split_words('pay "bob 5')
    with pytest.raises(UsageError, match="it ends with"):
        split_words("pay bob 5 \\")


def test_command_options() -> None:
    assert parse_args("pay", ["bob", "5"]) == (["bob", "5"], {})
    assert parse_args("pay", ["bob", "--id", PID, "5"]) == (
        ["bob", "5"],
        {"--id": uuid.UUID(PID)},
    )
    assert parse_args("pay", ["bob", "5", f"--id={PID.upper()}"])[1] == {"--id": uuid.UUID(PID)}
    assert parse_args("pay", ["bob", "5", "--memo", "a; b", "--id", PID]) == (
        ["bob", "5"],
        {"--memo": "a; b", "--id": uuid.UUID(PID)},
    )
    assert parse_args("pay", [f"--request={PID}"]) == ([], {"--request": uuid.UUID(PID)})
    assert parse_args("request", ["bob", "5", "--memo=rent", "--expires", "2h"]) == (
        ["bob", "5"],
        {"--memo": "rent", "--expires": 7200},
    )
    assert parse_args("deposit", ["5", "--id", PID]) == (["5"], {"--id": uuid.UUID(PID)})
    args, options = parse_args("history", ["--csv", "--with", "Bob", "--limit", "5000"])
    assert args == [] and options == {"--csv": True, "--with": "Bob", "--limit": 5000}
    for command, words, message in [
        ("pay", ["bob", "5", "--anything"], "pay does not take '--anything'"),
        ("pay", ["bob", "5", "extra"], "pay does not take 'extra'"),
        ("pay", ["bob", "5", "--id"], "--id needs a value"),
        ("pay", ["bob", "5", "--id", "42"], "'42' is not a payment id"),
        ("pay", ["bob", "5", "--id", PID.replace("-", "")], "is not a payment id"),
        ("pay", ["bob", "5", "--id", PID, "--id", PID], "--id is given twice"),
        ("pay", ["bob", "5", "--memo", ""], "a memo cannot be empty"),
        ("pay", ["bob", "5", "--memo", "a\nb"], "cannot contain control characters"),
        ("pay", ["--request", "42"], "'42' is not a request id"),
        ("deposit", ["5", "--id", "42"], "'42' is not a deposit id"),
        ("receipt", [PID, "--out="], "the file name is empty"),
        ("request", ["bob", "5", "--id", PID], "request does not take '--id'"),
        ("history", ["--csv=yes"], "--csv takes no value"),
        ("history", ["--out="], "the file name is empty"),
        ("history", ["--limit", "0"], "from 1 to"),
        ("history", ["--with", "no one"], "not a valid name"),
        ("balance", ["now"], "balance does not take 'now'"),
        ("status", [PID, PID], "status does not take"),
    ]:
        with pytest.raises(UsageError, match=message):
            parse_args(command, words)


def test_payment_ids() -> None:
    assert parse_payment_id(PID) == uuid.UUID(PID)
    assert parse_payment_id(PID.upper()) == uuid.UUID(PID)
    for bad in ("", "x", "{" + PID + "}", "urn:uuid:" + PID, PID + "0"):
        with pytest.raises(UsageError):
            parse_payment_id(bad)


def _ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    moment = dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.UTC)
    return int(moment.timestamp() * 1000)


def test_dates_are_utc_and_a_date_alone_is_the_whole_day() -> None:
    assert parse_since("2026-11-29") == _ms(2026, 11, 29)
    assert parse_until("2026-11-29") == _ms(2026, 11, 30)  # the 29th included
    assert parse_since("2026-11-29T14:30") == _ms(2026, 11, 29, 14, 30)
    assert parse_since("2026-11-29 14:30:05") == _ms(2026, 11, 29, 14, 30, 5)
    assert parse_until("2026-11-29T14:30Z") == _ms(2026, 11, 29, 14, 30)
    assert parse_since("2026-11-29T15:30+01:00") == _ms(2026, 11, 29, 14, 30)
    for bad in ("yesterday", "29/11/2026", "2026-13-01", "2026-11-29T25:00", ""):
        with pytest.raises(UsageError, match="--since takes a date"):
            parse_since(bad)


def test_completion() -> None:
    names = ["alice", "bob", "bert"]
    assert complete("", names)[:3] == ["balance", "cancel-request", "decline-request"]
    assert complete("pa", names) == ["passwd", "pay"]
    assert complete("req", names) == ["request", "requests"]
    assert complete("h", names) == ["help", "history"]
    assert complete("pay b", names) == ["bert", "bob"]
    assert complete("pay ", names) == ["alice", "bert", "bob"]
    assert complete("pay bob ", names) == []  # the amount: nothing to offer
    assert complete("pay bob 5 --", names) == ["--id", "--memo", "--request"]
    assert complete("pay --request ", names) == []  # a request id: nothing to offer
    assert complete("request b", names) == ["bert", "bob"]
    assert complete("request bob 5 --e", names) == ["--expires"]
    assert complete("history --w", names) == ["--with"]
    assert complete("history --with a", names) == ["alice"]
    assert complete("deposit ", names) == []


def test_csv_is_rfc_4180_with_a_header() -> None:
    pid = uuid.UUID(PID)
    entries = [
        p.HistoryEntry("sent", 30, 70, _ms(2026, 11, 29, 14, 30), "bob", pid, 'lunch, "the" usual'),
        p.HistoryEntry("deposit", 100, 100, _ms(2026, 11, 29), None, None),
    ]
    text = csv_rows(entries, header=True)
    assert text.count("\r\n") == 3 and text.endswith("\r\n")
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert rows[0] == list(CSV_HEADER)
    assert rows[1] == [
        "2026-11-29T14:30:00Z",
        str(_ms(2026, 11, 29, 14, 30)),
        "sent",
        "30",
        "70",
        "bob",
        PID,
        'lunch, "the" usual',
    ]
    assert rows[2][2:] == ["deposit", "100", "100", "", "", ""]


def test_a_memo_never_becomes_a_spreadsheet_formula() -> None:
    # The memo is the other party's text: a spreadsheet opening the export must not run it.
    pid = uuid.UUID(PID)
    memos = ['=HYPERLINK("http://evil")', "+1", "-2+3", "@SUM(A1)", "\tx", "fine = ok"]
    entries = [p.HistoryEntry("received", 1, 1, 0, "mallory", pid, m) for m in memos]
    rows = list(csv.reader(io.StringIO(csv_rows(entries), newline="")))
    assert [row[-1] for row in rows] == [
        '\'=HYPERLINK("http://evil")',
        "'+1",
        "'-2+3",
        "'@SUM(A1)",
        "'\tx",
        "fine = ok",
    ]


# --- where the client connects ---------------------------------------------------------------


def test_server_addresses() -> None:
    assert parse_server("pay.example.org:9000", 8700) == ("pay.example.org", 9000)
    assert parse_server("pay.example.org", 8700) == ("pay.example.org", 8700)
    assert parse_server("[::1]:9000", 8700) == ("::1", 9000)
    assert parse_server("[::1]", 8700) == ("::1", 8700)
    assert parse_server("fe80::1", 8700) == ("fe80::1", 8700)
    for bad in ("", ":9000", "host:", "host:0", "host:65536", "host:x", "[::1", "[::1]x"):
        with pytest.raises(ValueError, match=r"HOST|host|port"):
            parse_server(bad, 8700)


def test_profiles(tmp_path: Path) -> None:
    path = tmp_path / "client.toml"
    assert load_profile(path, 8700) == Profile()  # none: fine
    path.write_text(
        'server = "class.example.org:8800"\ncafile = "ca.pem"\nuser = "alice"\n'
        'server_name = "class"\naccept = "all"\npassword_file = "~/pw"\n'
    )
    profile = load_profile(path, 8700)
    assert profile.server == ("class.example.org", 8800)
    assert profile.cafile == tmp_path / "ca.pem"  # relative to the profile
    assert profile.password_file == Path.home() / "pw"
    assert (profile.user, profile.server_name, profile.accept) == ("alice", "class", "all")
    for content, message in [
        ("server = ", "not valid TOML"),
        ('sever = "x"', "unknown key 'sever'"),
        ("server = 8700", "server must be a non-empty string"),
        ('server = "x:0"', "server: 'x:0': the port"),
        ('accept = "maybe"', "accept must be one of"),
        ('user = ""', "user must be a non-empty string"),
    ]:
        path.write_text(content)
        with pytest.raises(ProfileError) as info:
            load_profile(path, 8700)
        assert str(info.value).startswith(f"{path}: ") and message in str(info.value)
        assert "\n" not in str(info.value)
    path.write_bytes(b"\xff")
    with pytest.raises(ProfileError, match="not UTF-8"):
        load_profile(path, 8700)


def test_flags_beat_the_environment_which_beats_the_profile(tmp_path: Path) -> None:
    profile = Profile(
        server=("profile.host", 1111),
        cafile=tmp_path / "profile-ca.pem",
        server_name="profile-name",
        user="profile-user",
        accept="none",
    )
    env = {"P2PPAY_SERVER": "env.host:2222", "P2PPAY_CAFILE": "/env/ca.pem", "P2PPAY_USER": "e"}
    default_ca = tmp_path / "default-ca.pem"

    def settings(env: dict[str, str], profile: Profile, **flags: object) -> tuple[object, ...]:
        args: dict[str, object] = dict.fromkeys(
            ("host", "port", "cafile", "server_name", "user", "password_file", "accept")
        )
        args.update(flags)
        c = resolve(
            **args,  # type: ignore[arg-type]
            env=env,
            profile=profile,
            default_port=8700,
            default_cafile=default_ca,
        )
        return (c.host, c.port, str(c.cafile), c.server_name, c.user, c.accept)

    assert settings({}, Profile()) == ("localhost", 8700, str(default_ca), None, None, "ask")
    assert settings({}, profile) == (
        "profile.host",
        1111,
        str(tmp_path / "profile-ca.pem"),
        "profile-name",
        "profile-user",
        "none",
    )
    # The environment's server comes without the profile's server_name (it names another).
    assert settings(env, profile) == ("env.host", 2222, "/env/ca.pem", None, "e", "none")
    assert settings(
        env, profile, host="flag.host", cafile=Path("/flag.pem"), user="f", accept="all"
    ) == ("flag.host", 8700, "/flag.pem", None, "f", "all")
    assert settings(env, profile, host="flag.host", port=3333)[:2] == ("flag.host", 3333)
    with pytest.raises(ProfileError, match="P2PPAY_SERVER: 'bad:port'"):
        settings({"P2PPAY_SERVER": "bad:port"}, profile)


def test_the_client_command_reads_them(
    monkeypatch: pytest.MonkeyPatch, own_client_settings: Path
) -> None:
    own_client_settings.mkdir(parents=True)
    (own_client_settings / "client.toml").write_text('server = "p.example:1234"\nuser = "pat"\n')
    parse = build_parser().parse_args
    options = client_options(parse(["client"]))
    assert (options.host, options.port, options.user) == ("p.example", 1234, "pat")
    monkeypatch.setenv("P2PPAY_SERVER", "e.example:4321")
    options = client_options(parse(["client", "--user", "flag"]))
    assert (options.host, options.port, options.user) == ("e.example", 4321, "flag")
    options = client_options(parse(["client", "f.example"]))
    assert (options.host, options.port) == ("f.example", 8700)


def test_the_readme_lists_every_command_and_option() -> None:
    from p2ppay.cli.shell import MAX_ARGS, OPTIONS

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    table = readme.split("### The client's commands", 1)[1].split("\n\n")[1]
    rows = {line.split("`")[1].split()[0]: line for line in table.splitlines()[2:]}
    assert set(MAX_ARGS) - {"quit", "exit"} <= set(rows), sorted(set(MAX_ARGS) - set(rows))
    for command, options in OPTIONS.items():
        for option in options:
            assert f"{option}" in rows[command].split("|")[1], (command, option)
