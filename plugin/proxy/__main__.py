from plugin.proxy.main import main

main()
