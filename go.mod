module atomkv

go 1.24
