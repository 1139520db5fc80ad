"""Plain-text tables: what a piped `relucap` command prints must stay one row per line."""

from relucap_plugin._console import format_table, print_table


def test_line_breaks_in_headers_and_cells_do_not_split_rows(capsys):
    columns = ["model", "PGD\ntorchattacks", "worst\ncase"]
    rows = [["cap 0.1\nall", "47.5%", "12.5%"], ["relu", "9.5%", None]]
    text = format_table(columns, rows)
    lines = text.splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[0].split() == ["model", "PGD", "torchattacks", "worst", "case"]
    assert lines[2].startswith("cap 0.1 all") and lines[3].split() == ["relu", "9.5%"]
    print_table(columns, rows, title="t")  # captured stdout is not a terminal: the plain table
    assert capsys.readouterr().out == "t\n" + text + "\n"
