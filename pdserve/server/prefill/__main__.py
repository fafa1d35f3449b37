from pdserve.server.prefill.main import main

main()
