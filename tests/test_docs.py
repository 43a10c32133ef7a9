"""The README guides and docs/ holds the reference: links that lead somewhere, nothing left out.

Readers follow the README's links into docs/ and the pages' links into each other, on
the forge and in the .deb's /usr/share/doc; a renamed heading or page breaks them
silently, so every relative link and #anchor is checked against the headings as the
forge turns them into anchors. The reference is only useful if it is whole: every
setting, command and endpoint the code has is on its page.
"""
import dataclasses
import pathlib
import re

import click
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PAGES = ("configuration", "http-api", "cli", "operations", "webhooks", "dashboard",
         "performance", "migration")
README_MAX_LINES = 320  # a guide of about 300 lines; the reference belongs in docs/

FENCE = re.compile(r"^(```|~~~)")
INLINE_CODE = re.compile(r"`+[^`]*`+")
# [text](target) and ![alt](target); the text may span lines, the target may not.
LINK = re.compile(r"!?\[(?:[^\]]|\n)*?\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")


def markdown_files():
    return [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))


def prose(text):
    """The text outside fenced code blocks, inline code blanked: links in code are not links."""
    kept, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            kept.append("")
            continue
        kept.append("" if fenced else INLINE_CODE.sub(lambda m: " " * len(m.group()), line))
    return "\n".join(kept)


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    """Every anchor the forge makes for a page's headings, repeats numbered as it numbers them."""
    seen, result = {}, set()
    fenced = False
    for line in path.read_text().splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        match = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def broken_links(path, root=REPO):
    """What is wrong with each relative link and anchor of one Markdown file, as messages."""
    problems = []
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # https:, mailto:, file:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}: {target}"
        if not linked.exists():
            problems.append(f"{where}: no file {file_part}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            problems.append(f"{where}: no heading #{anchor} in {linked.name}")
        elif anchor and linked.suffix != ".md":
            problems.append(f"{where}: an anchor into a file that has no headings")
    return problems


def test_the_reference_pages_are_there():
    for page in PAGES:
        assert (REPO / "docs" / f"{page}.md").is_file(), page


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_leads_somewhere(path):
    assert broken_links(path) == []


def test_the_link_check_sees_a_missing_file_a_missing_anchor_and_ignores_code(tmp_path):
    (tmp_path / "other.md").write_text(
        "# Other\n\n## Sharing a busy GPU fairly\n\n## Sharing a busy GPU fairly\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n## OpenAI API (`/v1`)\n\n"
        "[ok](other.md#sharing-a-busy-gpu-fairly) [ok too](other.md#sharing-a-busy-gpu-fairly-1)\n"
        "[here](#openai-api-v1) [web](https://example.com/x.md#nothing)\n"
        "[gone](missing.md) [no anchor](other.md#sharing-a-gpu)\n"
        "[split\nacross lines](#nowhere)\n"
        "`[in code](missing-too.md)`\n\n```\n[in a block](missing-three.md)\n```\n")
    assert broken_links(page, root=tmp_path) == [
        "page.md: missing.md: no file missing.md",
        "page.md: other.md#sharing-a-gpu: no heading #sharing-a-gpu in other.md",
        "page.md: #nowhere: no heading #nowhere in page.md",
    ]


def test_the_readme_is_a_guide_not_the_reference():
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move reference to docs/"


def test_every_setting_is_in_the_configuration_page():
    from app.config import Settings

    text = (REPO / "docs" / "configuration.md").read_text()
    missing = [f.name for f in dataclasses.fields(Settings) if f"| `{f.name}`" not in text]
    assert missing == [], "settings without a row in docs/configuration.md"


def test_every_command_is_in_the_command_line_page():
    import cli

    def commands(command, path):
        if not isinstance(command, click.Group) or command.invoke_without_command:
            yield " ".join(path)
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield from commands(sub, path + [name])

    text = (REPO / "docs" / "cli.md").read_text()
    every = [name for name in commands(cli.cli, []) if name]
    assert "keys add" in every and "db upgrade" in every
    assert [name for name in every if f"`ollama-gw {name}" not in text] == []


def test_every_route_is_in_the_http_endpoints_table(app):
    """Each route the app serves is a row of docs/http-api.md's table ({KEY} for any parameter).

    Not checked: the dashboard's pages (one row, `/ui/…`), the vendored pages' assets, and
    the catch-alls that relay whatever Ollama serves under /api/ and /v1/.
    """
    page = (REPO / "docs" / "http-api.md").read_text()
    table = page.split("## HTTP endpoints", 1)[1].split("\n## ", 1)[0]
    table = re.sub(r"\{[^}]*\}", "{}", table)
    undocumented = []
    for rule in app.url_map.iter_rules():
        path = rule.rule
        if path.startswith(("/ui/", "/docs/assets/")) or "<path:" in path:
            continue
        path = re.sub(r"<[^>]*>", "{}", path)
        if not re.search(re.escape(path) + r"(?![\w/{])", table):
            undocumented.append(path)
    assert undocumented == []


def test_the_package_ships_the_pages_its_unit_and_manual_point_at():
    """debian/ollama-gw.docs installs them; dh_compress gzips what is over 4 KiB."""
    shipped = (REPO / "debian" / "ollama-gw.docs").read_text().split()
    for entry in shipped:
        assert (REPO / entry).exists(), entry
    assert "docs" in shipped or "docs/" in shipped
    unit = (REPO / "systemd" / "ollama-gw.service").read_text()
    documentation = [line for line in unit.splitlines() if line.startswith("Documentation=")]
    pointed = re.findall(r"/usr/share/doc/ollama-gw/(\S+)",
                         "\n".join(documentation + [(REPO / "debian" / "ollama-gw.1").read_text()]))
    assert any(p.startswith("docs/") for p in pointed), pointed
    for installed in pointed:
        source = REPO / installed.removesuffix(".gz")
        assert source.is_file(), installed
        compressed = source.stat().st_size > 4096
        assert installed.endswith(".gz") == compressed, (
            f"{installed}: dh_compress {'gzips' if compressed else 'leaves'} {source.name}")
