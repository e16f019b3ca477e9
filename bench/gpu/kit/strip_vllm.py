import zipfile, sys, copy
src, dst = sys.argv[1], sys.argv[2]
DROP = "vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so"
REC = "vllm-0.26.0.dist-info/RECORD"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
    names = zin.namelist()
    assert DROP in names and names[-1] == REC, names[-1]
    for info in zin.infolist():
        if info.filename == DROP:
            continue
        data = zin.read(info)
        if info.filename == REC:
            lines = data.decode().splitlines(keepends=True)
            kept = [l for l in lines if not l.startswith(DROP + ",")]
            assert len(kept) == len(lines) - 1
            data = "".join(kept).encode()
        ni = zipfile.ZipInfo(info.filename, date_time=info.date_time)
        ni.external_attr = info.external_attr
        ni.create_system = info.create_system
        ni.compress_type = zipfile.ZIP_DEFLATED
        zout.writestr(ni, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
print("ok")
