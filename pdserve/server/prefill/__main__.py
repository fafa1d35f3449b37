from pdserve.server.prefill.servicer import main

main()
