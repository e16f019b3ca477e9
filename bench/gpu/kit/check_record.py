import zipfile, sys, hashlib, base64, csv, io
bad = 0
for p in sys.argv[1:]:
    z = zipfile.ZipFile(p)
    assert z.testzip() is None, p
    rec = [n for n in z.namelist() if n.endswith(".dist-info/RECORD")]
    assert len(rec) == 1, (p, rec)
    rows = {r[0]: r for r in csv.reader(io.StringIO(z.read(rec[0]).decode())) if r}
    names = set(z.namelist()) - {n for n in z.namelist() if n.endswith("/")}
    for n in names:
        if n == rec[0]: continue
        r = rows.get(n)
        if r is None: print("NOT IN RECORD", p, n); bad += 1; continue
        d = z.read(n)
        h = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b"=").decode()
        if r[1] != h or int(r[2]) != len(d): print("MISMATCH", p, n); bad += 1
    for n in rows:
        if n not in names: print("RECORD lists missing file", p, n); bad += 1
print("bad", bad)
